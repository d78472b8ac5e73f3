"""Console logging for the CLI: the platform's own messages, library chatter only with ``-v``.

By default the console shows records of the project's loggers from INFO up and the libraries'
(Ray, Prefect, MLflow, Feast, Flink/Beam, ...) from WARNING up; library deprecation notices
(``DeprecationWarning``, ``FutureWarning`` raised inside a library) and progress bars that
libraries draw themselves (Ray Data, tqdm, MLflow's artifact downloads) are off, so the CLI's
own Rich progress is the only one. ``-v`` (verbose) shows everything at DEBUG.

Libraries that configure their loggers on import read environment variables, so
:func:`library_environment` is applied before they are imported and is inherited by the
processes the CLI starts (local Ray workers, the Flink job, the MLflow and Prefect servers).
Warnings the project itself triggers are fixed at their source, not filtered here: a warning
attributed to a project module stays visible.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from importlib import resources
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("recsys_core", "recsys_platform", "recsys_pipelines", "recsys_models",
                    "__main__")
LIBRARY_LEVEL = logging.WARNING  # library records below this are hidden unless verbose
LIBRARY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Always: settings that fix a behaviour rather than hide output.
_ALWAYS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls (they fail offline)
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default; silences its tip
}
# Unless verbose: libraries' own console output off or at WARNING.
_QUIET = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's bars and "logging_progress" lines
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "TQDM_DISABLE": "1",  # tqdm bars of Feast materialize and friends
}

# Unless verbose: library loggers whose notices at WARNING are about optional parts the
# platform never uses. Beam (under PyFlink) tries every filesystem on import and warns that
# GCS needs google-cloud-storage, which the local file/Redis job does not.
_QUIET_LOGGERS = {"apache_beam.io.filesystems": logging.ERROR}


def is_project(logger_name: str) -> bool:
    """True for the platform's own loggers (``recsys_*`` packages and scripts)."""
    return logger_name.split(".", 1)[0] in PROJECT_PACKAGES


def shows(logger_name: str, level: int, verbose: bool, project_level: int = logging.INFO
          ) -> bool:
    """Whether the console shows a record: all when verbose, else the project's from
    ``project_level`` (INFO; the demo, whose tables say it all: WARNING) and the libraries'
    from :data:`LIBRARY_LEVEL`."""
    if verbose:
        return True
    return level >= (project_level if is_project(logger_name) else LIBRARY_LEVEL)


class ConsoleFilter(logging.Filter):
    """Applies :func:`shows` on the console handler (libraries keep their own levels, so their
    file and API handlers, e.g. Prefect's flow-run logs in its UI, still get every record)."""

    def __init__(self, verbose: bool, project_level: int = logging.INFO) -> None:
        super().__init__()
        self.verbose = verbose
        self.project_level = project_level

    def filter(self, record: logging.LogRecord) -> bool:
        return shows(record.name, record.levelno, self.verbose, self.project_level)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each record, so lines logged while a Rich progress
    bar is live go through Rich (which swaps ``sys.stderr``) and land above the bar.

    (A public name: Prefect keeps a root handler whose class name does not start with ``_``.)
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def hides_warning(category: type[Warning], filename: str, verbose: bool) -> bool:
    """Whether a warning is a library's deprecation notice to hide: raised (by its
    ``stacklevel``) in a file outside the project's packages, and not verbose."""
    return (not verbose and issubclass(category, LIBRARY_WARNINGS)
            and not any(part in PROJECT_PACKAGES for part in Path(filename).parts))


def _hiding_showwarning(show: Callable[..., None]) -> Callable[..., None]:
    def showwarning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, file: Any = None, line: str | None = None) -> None:
        if not hides_warning(category, filename, verbose=False):
            show(message, category, filename, lineno, file, line)

    showwarning.recsys_quiet = True  # type: ignore[attr-defined]
    return showwarning


def ray_data_logging_config() -> str:
    """Path of the Ray Data logging config whose console handler shows ERROR and up
    (Ray Data's default prints INFO; its session log file keeps DEBUG)."""
    return str(resources.files("recsys_core") / "ray_data_logging.yaml")


def library_environment(verbose: bool, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables to set for a run: only those not set already, so a user's
    own ``RAY_DATA_DISABLE_PROGRESS_BARS=0`` (say) wins."""
    env = os.environ if environ is None else environ
    wanted = dict(_ALWAYS)
    if not verbose:
        wanted |= _QUIET | {"RAY_DATA_LOGGING_CONFIG": ray_data_logging_config()}
    return {k: v for k, v in wanted.items() if k not in env}


@contextmanager
def library_stdout(logger: logging.Logger) -> Iterator[None]:
    """Turns what a library prints to stdout inside the block (Feast's materialize
    progress) into DEBUG records of ``logger``, shown with ``-v``."""
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("%s", _ANSI.sub("", line).rstrip())


def quiet_after_import(*names: str) -> None:
    """Raises loggers that a library configures when it is imported (level and handler of
    their own: Ray Serve's driver logger) to :data:`LIBRARY_LEVEL`, unless verbose. Call right
    after the import."""
    if not _verbose[0]:
        for name in names:
            logging.getLogger(name).setLevel(LIBRARY_LEVEL)


_verbose = [True]  # until configure() runs: a library user's process keeps its own levels


def configure(verbose: bool, project_level: int = logging.INFO) -> None:
    """Configures console logging and library output once, in an entrypoint (or a child process
    the CLI spawns). Call before the libraries are imported.

    Args:
        verbose: everything at DEBUG (``-v``).
        project_level: the least level of the project's own records shown when not verbose
            (``recsys demo``: WARNING, its stage tables and progress carry the rest).
    """
    _verbose[0] = verbose
    os.environ.update(library_environment(verbose))
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ConsoleFilter(verbose, project_level))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
    logging.captureWarnings(False)
    if not verbose and not getattr(warnings.showwarning, "recsys_quiet", False):
        # At display time, not as a filter: libraries insert filters of their own on import
        # (Feast: simplefilter("once", DeprecationWarning)) ahead of any set here.
        warnings.showwarning = _hiding_showwarning(warnings.showwarning)
