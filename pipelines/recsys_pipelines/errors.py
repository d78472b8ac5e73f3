"""Exceptions of the batch pipeline (ETL, features, Feast). Each builds its own message."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from recsys_core.errors import RecsysError


class PipelineError(RecsysError):
    """Base class of the batch pipeline's errors."""


class DateRangeError(PipelineError):
    """A date range is empty or reversed."""

    def __init__(self, start: date, end: date) -> None:
        super().__init__(
            f"invalid date range {start.isoformat()}..{end.isoformat()}: "
            "start must be on or before end (both inclusive, YYYY-MM-DD)"
        )
        self.start = start
        self.end = end


class LandingPartitionError(PipelineError):
    """A landing partition exists but cannot be read."""

    def __init__(self, path: Path, cause: Exception) -> None:
        super().__init__(
            f"landing partition {path} cannot be read ({type(cause).__name__}: {cause}); "
            "fix or remove the file, then re-run the ETL for its dates"
        )
        self.path = path


class EmptyLakeError(PipelineError):
    """Feature computation found no clean events for the requested days."""

    def __init__(self, lake_dir: Path, start: date, end: date) -> None:
        super().__init__(
            f"no clean events in {lake_dir}/events for {start.isoformat()}..{end.isoformat()}: "
            "run `recsys etl run --start ... --end ...` first"
        )
        self.lake_dir = lake_dir


class FeatureRepoError(PipelineError):
    """The Feast repository folder is missing its definitions."""

    def __init__(self, repo_path: Path, hint: str) -> None:
        super().__init__(f"Feast repository {repo_path}: {hint}")
        self.repo_path = repo_path


class TrainingSetError(PipelineError):
    """Labelled impressions do not have the columns a training set needs."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"labelled impressions are missing columns {sorted(missing)}; "
            "build them with recsys_pipelines.training_set.label_impressions"
        )
        self.missing = missing
