"""Retained checkpoints on the durable local state directory."""

from __future__ import annotations

from pathlib import Path

from recsys_pipelines.stream.errors import CheckpointNotFoundError


def completed_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Every ``<job-id>/chk-N`` with a ``_metadata`` file (complete), oldest first."""
    found = [p.parent for p in checkpoint_dir.glob("*/chk-*/_metadata")]
    return sorted(found, key=lambda p: (p.joinpath("_metadata").stat().st_mtime,
                                        int(p.name.split("-")[1])))


def latest_checkpoint(checkpoint_dir: Path) -> Path:
    """The newest completed checkpoint.

    Raises:
        CheckpointNotFoundError: None is retained.
    """
    found = completed_checkpoints(checkpoint_dir)
    if not found:
        raise CheckpointNotFoundError(str(checkpoint_dir))
    return found[-1]
