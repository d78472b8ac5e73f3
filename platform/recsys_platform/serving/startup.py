"""What makes a replica start sooner: its Feast imports without typeguard's instrumentation.

A replica reads Feast's registry (its feature service and views) and the Redis layout once, at
start. Feast decorates its classes with typeguard's ``@typechecked``, which re-parses and
recompiles each decorated module's source when it is imported: measured on 2 cores, 5.0 s of
the 7.4 s of CPU a replica's ``build_recommender`` took, so a new replica on a spike waited for
it while competing for the serving replica's cores. :func:`import_feast_unchecked` imports the
Feast modules a replica uses with that decorator as a no-op (``python -O`` does the same for the
whole process, asserts included): the classes are Feast's own, only the runtime checks of
their arguments are gone, and a replica builds Feast objects only from the registry, which
``feast apply`` validated. Any Feast module imported later is instrumented as usual.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any

# What ``build_recommender`` imports of Feast (the store, its Redis and Dask plugins, the
# file registry), measured by diffing ``sys.modules``; the rest comes in with ``feast``.
FEAST_MODULES = ("feast", "feast.repo_config", "feast.infra.online_stores.redis",
                 "feast.infra.offline_stores.dask", "feast.infra.registry.file",
                 "feast.repo_operations")

_lock = threading.Lock()


def _unchecked(target: Any = None, **_: Any) -> Any:
    """``typeguard.typechecked`` that checks nothing (both of its call forms)."""
    if target is None:
        return _unchecked
    return target


def import_feast_unchecked(modules: tuple[str, ...] = FEAST_MODULES) -> bool:
    """Imports ``modules`` with ``typeguard.typechecked`` replaced by a no-op, then puts the
    real one back. Returns False (and imports nothing) where Feast was imported already."""
    with _lock:
        if "feast" in sys.modules:
            return False
        import typeguard

        real: Callable[..., Any] = typeguard.typechecked
        typeguard.typechecked = _unchecked  # type: ignore[assignment]
        try:
            for name in modules:
                importlib.import_module(name)
        finally:
            typeguard.typechecked = real
        return True
