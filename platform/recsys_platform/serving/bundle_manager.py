"""Loads the champion bundle, polls its alias, swaps new versions in atomically.

A request reads :attr:`BundleManager.current` once and uses that :class:`LoadedBundle` for its
whole life, so no request ever mixes two versions. A new version is loaded and smoke-tested
beside the old one; only then is the reference replaced (one assignment). A version that fails
to load or fails the smoke query is rejected and remembered, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recsys_platform.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedBundle:
    version: str
    bundle: Any  # recsys_models.bundle.Bundle


class BundleManager:
    """Holds the bundle being served.

    Args:
        resolve_version: Returns the version the alias points at now (None when unset).
        load: Loads one version.
        smoke: Raises when a loaded bundle cannot answer a query.
        metrics: Where swaps and rejections are counted.
    """

    def __init__(
        self,
        resolve_version: Callable[[], str | None],
        load: Callable[[str], Any],
        smoke: Callable[[Any], None],
        metrics: ServingMetrics,
    ) -> None:
        self._resolve = resolve_version
        self._load = load
        self._smoke = smoke
        self._metrics = metrics
        self._current: LoadedBundle | None = None
        self._rejected: set[str] = set()
        self._lock = threading.Lock()  # one refresh at a time; reads never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    @property
    def current(self) -> LoadedBundle | None:
        return self._current

    @property
    def rejected_versions(self) -> set[str]:
        return set(self._rejected)

    def refresh(self) -> bool:
        """Checks the alias once; returns True when a new version was swapped in."""
        with self._lock:
            try:
                version = self._resolve()
            except Exception as exc:  # registry down: keep serving what we have
                self.last_error = f"cannot resolve alias: {exc}"
                logger.warning(self.last_error)
                return False
            current = self._current
            if version is None or version in self._rejected:
                return False
            if current is not None and current.version == version:
                return False
            try:
                bundle = self._load(version)
                self._smoke(bundle)
            except Exception as exc:
                self._rejected.add(version)
                self._metrics.bundle_rejections.inc()
                self.last_error = f"bundle version {version} rejected: {exc}"
                logger.error(self.last_error)
                return False
            self._current = LoadedBundle(version, bundle)  # the atomic swap
            self._metrics.bundle_swaps.inc()
            if version.isdigit():
                self._metrics.served_version.set(int(version))
            logger.info("serving bundle version %s (was %s)", version,
                        current.version if current else None)
            return True

    def start(self, poll_interval_s: float) -> None:
        """Polls the alias in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(poll_interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="bundle-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
