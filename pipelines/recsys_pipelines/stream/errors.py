"""Errors of the stream job, each with a message that says what to do."""

from __future__ import annotations

from recsys_core.errors import RecsysError


class StreamError(RecsysError):
    """Base class of the stream job's errors."""


class CheckpointNotFoundError(StreamError):
    """A restart was asked for but no completed checkpoint is retained."""

    def __init__(self, checkpoint_dir: str) -> None:
        super().__init__(
            f"no completed checkpoint (chk-N/_metadata) under {checkpoint_dir}; "
            "start the job without --restore, or check settings.flink.checkpoint_dir"
        )
        self.checkpoint_dir = checkpoint_dir


class StreamSourceError(StreamError):
    """The configured source cannot be used."""

    def __init__(self, source: str, hint: str) -> None:
        super().__init__(f"stream source {source!r} cannot be used: {hint}")
        self.source = source
