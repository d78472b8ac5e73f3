"""Serving loads registered bundles without pickle, and only with a matching digest and source.

Before: replicas unpickled ``python_model.pkl`` (cloudpickle) through ``mlflow.pyfunc``, and a
version created with an arbitrary local ``source`` path was loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from recsys_core.settings import MlflowSettings, Settings, load_settings
from recsys_models.errors import BundleIntegrityError
from recsys_models.provenance import DIGEST_TAG, bundle_digest, load_verified
from recsys_models.registry import register_bundle
from tests.fixtures.mlflow_store import MlflowStore
from tests.model.snapshots import trained_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(store: MlflowStore, tmp_path: Path) -> Settings:
    mlflow = MlflowSettings(tracking_uri=store.tracking_uri,
                            artifact_location=str(store.artifact_dir), experiment="supply-chain",
                            model_name="bundle-supply-chain")
    return load_settings("local").model_copy(update={"data_dir": tmp_path, "mlflow": mlflow})


def _model_dir(store: MlflowStore, name: str, version: str) -> Path:
    """Where the artifact store keeps this version's files (found by its bundle.json)."""
    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    digest = client.get_model_version(name, version).tags[DIGEST_TAG]
    for meta in store.artifact_dir.rglob("artifacts/bundle/bundle.json"):
        if bundle_digest(meta.parent) == digest:
            return meta.parent.parent.parent
    raise AssertionError(f"version {version} not found under {store.artifact_dir}")


def test_served_bundles_are_verified_and_never_unpickled(tmp_path: Path) -> None:
    # A store of its own: the session's store holds other copies of the same cached bundle.
    store = MlflowStore("sqlite", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    settings = _settings(store, tmp_path)
    name, uri = settings.mlflow.model_name, settings.mlflow_tracking_uri
    good = trained_bundle()
    version = register_bundle(settings, good, run_name="supply-chain").version
    client = MlflowClient(uri, uri)
    assert client.get_model_version(name, version).tags[DIGEST_TAG]

    model_dir = _model_dir(store, name, version)
    # The pyfunc is logged as code (no python_model.pkl); any pickle that is there anyway is
    # corrupted: serving must not need it.
    assert (model_dir / "MLmodel").is_file()
    for pickled in model_dir.rglob("*.pkl"):
        pickled.write_bytes(b"not a pickle: loading it would fail")
    loaded = load_verified(uri, name, version, str(store.artifact_dir))
    users = pd.DataFrame([{"user_id": "u1", "user_history": list(good.item_ids[:3])}])
    np.testing.assert_allclose(loaded.encode_users(users), good.encode_users(users), atol=1e-6)

    weights = model_dir / "artifacts" / "bundle" / "weights.pt"  # tampered after registration
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="artifact digest"):
        load_verified(uri, name, version, str(store.artifact_dir))

    foreign = client.create_model_version(name, source=str(tmp_path / "elsewhere"))
    with pytest.raises(BundleIntegrityError, match="no recorded artifact digest"):
        load_verified(uri, name, str(foreign.version), str(store.artifact_dir))
    client.set_model_version_tag(name, str(foreign.version), DIGEST_TAG, "0" * 64)
    with pytest.raises(BundleIntegrityError, match="is not an artifact of this registry"):
        load_verified(uri, name, str(foreign.version), str(store.artifact_dir))
