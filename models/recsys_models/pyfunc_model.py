"""The bundle pyfunc as MLflow "models from code": :func:`~recsys_models.registry.register_bundle`
logs this file rather than a pickled object, and MLflow runs it when the model is loaded.

See https://mlflow.org/docs/latest/ml/model/models-from-code/.
"""

from mlflow.models import set_model

from recsys_models.registry import BundleModel

set_model(BundleModel())
