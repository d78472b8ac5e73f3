"""Where a served bundle comes from, and proof that it is the one that was registered.

:func:`~recsys_models.registry.register_bundle` records the SHA-256 of the bundle's files
(:func:`bundle_digest`) as the version tag :data:`DIGEST_TAG`. Serving loads a version with
:func:`load_verified`: the version must carry that tag, its ``source`` must be a registry
artifact (``models:/``, ``runs:/`` or under the configured artifact location, never an
arbitrary path), the downloaded files must hash to the recorded digest, and only then are they
read, with no pickle: weights through ``torch.load(weights_only=True)``, specs from JSON, the
index, embeddings and catalog as plain files. The pyfunc wrapper's ``python_model.pkl`` is
downloaded with the rest but never unpickled.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from recsys_models.bundle import Bundle, load_bundle
from recsys_models.errors import BundleIntegrityError

DIGEST_TAG = "bundle_sha256"
BUNDLE_ARTIFACT = "artifacts/bundle"  # where the pyfunc model keeps the bundle directory
REGISTRY_SCHEMES = ("models:/", "runs:/")


def bundle_digest(directory: Path) -> str:
    """SHA-256 over every file of a bundle directory (relative path and content, sorted)."""
    total = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        total.update(path.relative_to(directory).as_posix().encode() + b"\0")
        total.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return total.hexdigest()


def check_source(version: str, source: str, artifact_location: str | None) -> None:
    """Raises unless ``source`` is a registry artifact (not a path someone pointed at).

    Raises:
        BundleIntegrityError: The source is a local path or URI outside the artifact store.
    """
    if source.startswith(REGISTRY_SCHEMES):
        return
    if artifact_location:
        root = artifact_location.removeprefix("file://").rstrip("/")
        if source.removeprefix("file://").startswith(root + "/"):
            return
    raise BundleIntegrityError(version, f"source {source!r} is not an artifact of this "
                                        "registry (models:/, runs:/ or the artifact location)")


def load_verified(tracking_uri: str, model_name: str, version: str,
                  artifact_location: str | None = None) -> Bundle:
    """Loads one registered version after checking its provenance and digest (no pickle).

    Raises:
        BundleIntegrityError: No recorded digest, a foreign source, or files that do not
            hash to the recorded digest.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    record = client.get_model_version(model_name, version)
    expected = (record.tags or {}).get(DIGEST_TAG)
    if not expected:
        raise BundleIntegrityError(version, f"no recorded artifact digest (tag {DIGEST_TAG}): "
                                            "register bundles with recsys_models.registry")
    check_source(version, str(record.source), artifact_location)
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="recsys-bundle-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp,
                tracking_uri=tracking_uri))
            directory = local / BUNDLE_ARTIFACT
            if not directory.is_dir():
                raise BundleIntegrityError(version, f"no {BUNDLE_ARTIFACT} in the model")
            actual = bundle_digest(directory)
            if actual != expected:
                raise BundleIntegrityError(version, f"artifact digest {actual[:12]} != "
                                                    f"recorded {expected[:12]}")
            return load_bundle(directory)
    finally:
        mlflow.set_registry_uri(previous)
