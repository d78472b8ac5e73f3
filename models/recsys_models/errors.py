"""Domain exceptions of the models package. Each builds its own message."""

from __future__ import annotations

from recsys_core.errors import RecsysError


class ModelsError(RecsysError):
    """Base class of every error raised on purpose by ``recsys_models``."""


class SnapshotNotFoundError(ModelsError):
    """No training snapshot where the caller looked."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no training snapshot under {path}: build one with the batch pipeline "
            "(recsys_pipelines.training_set) or pass --snapshot"
        )
        self.path = path


class EmptyTrainingSetError(ModelsError):
    """A training set has no rows (or no positives) after filtering."""

    def __init__(self, what: str) -> None:
        super().__init__(f"training set is empty: {what}; widen the snapshot or the time range")


class BundleFormatError(ModelsError):
    """A directory or MLflow artifact is not a model bundle this code can read."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"not a model bundle at {path}: {reason}")
        self.path = path


class AliasNotFoundError(ModelsError):
    """A registered model has no version behind an alias."""

    def __init__(self, model_name: str, alias: str) -> None:
        super().__init__(
            f"registered model {model_name!r} has no version with alias {alias!r}: "
            "train and register one (recsys train) or set the alias in the MLflow UI"
        )
        self.model_name = model_name
        self.alias = alias


class UnknownTrainingKeyError(ModelsError):
    """A ``training`` setting that no model config has a field for."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"unknown setting 'training.{key}': no field {key!r} in TrainConfig, "
            "TwoTowerConfig or EncoderSpec (ranker fields are 'ranker_<field>'); remove it "
            "or check its spelling")
        self.key = key


class PromotionRefusedError(ModelsError):
    """The promotion gate refused the challenger (below popularity by the margin, or worse than
    the champion)."""

    def __init__(self, version: str, reasons: list[str]) -> None:
        super().__init__(
            f"challenger version {version} not promoted: " + "; ".join(reasons)
            + " (pass --force with a reason to override, or retrain)"
        )
        self.version = version
        self.reasons = reasons


class TrainingFailedError(ModelsError):
    """Ray Train finished without a usable checkpoint."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"training failed: {reason}; see the Ray Train logs for the worker error")


class BundleIntegrityError(ModelsError):
    """A registered version's provenance or artifact digest does not check out."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"bundle version {version} refused: {reason}")
        self.version = version


class RayNotStartedError(ModelsError):
    """A Ray workload was called before the caller connected to Ray."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs a Ray connection: the caller starts it first "
            "(recsys ... commands and flows call ensure_ray(settings), which joins "
            "settings.ray.address or starts a local cluster); a bare ray.init() could join a "
            "running Serve head whose CPUs its replicas hold"
        )
