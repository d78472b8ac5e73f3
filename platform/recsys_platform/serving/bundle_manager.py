"""Loads the champion bundle, polls its alias, swaps new versions in atomically.

A request reads :attr:`BundleManager.current` once and uses that :class:`LoadedBundle` for its
whole life, so no request ever mixes two versions. A new version is loaded and smoke-tested
beside the old one; only then is the reference replaced (one assignment). A version that fails
to load or fails the smoke query is rejected and remembered, and the old one keeps serving.

Every version that passed its checks is recorded on local disk (:class:`LastGood`). A replica
that starts while the alias names a broken version (nothing to keep serving) falls back to
that last good version instead of serving popular items only; :attr:`BundleManager.fallback`
says so (``/readyz``, the ``recsys_bundle_fallback`` gauge) until the alias names a good one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys_core.atomic import atomic_write_text
from recsys_platform.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedBundle:
    version: str
    bundle: Any  # recsys_models.bundle.Bundle


class LastGood:
    """The last version of ``model`` that passed its load-time checks, in a local JSON file."""

    def __init__(self, path: Path, model: str) -> None:
        self.path, self.model = path, model

    def read(self) -> str | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        version = data.get("version") if isinstance(data, dict) else None
        return str(version) if version and data.get("model") == self.model else None

    def write(self, version: str) -> None:
        atomic_write_text(self.path, json.dumps({
            "model": self.model, "version": version,
            "passed_checks_at": datetime.now(UTC).isoformat()}))


class BundleManager:
    """Holds the bundle being served.

    Args:
        resolve_version: Returns the version the alias points at now (None when unset).
        load: Loads one version.
        smoke: Raises when a loaded bundle cannot answer a query.
        metrics: Where swaps and rejections are counted.
        last_good: Where the last version that passed its checks is kept (None: nowhere).
    """

    def __init__(
        self,
        resolve_version: Callable[[], str | None],
        load: Callable[[str], Any],
        smoke: Callable[[Any], None],
        metrics: ServingMetrics,
        last_good: LastGood | None = None,
    ) -> None:
        self._resolve = resolve_version
        self._load = load
        self._smoke = smoke
        self._metrics = metrics
        self._last_good = last_good
        self._current: LoadedBundle | None = None
        self._rejected: set[str] = set()
        self._lock = threading.Lock()  # one refresh at a time; reads never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.champion_version: str | None = None  # what the alias named at the last refresh
        self._loading = 0  # versions being loaded and checked now

    @property
    def loading(self) -> bool:
        """True while a version is being loaded and smoke-tested (the poller's background
        work: it takes the GIL and a core for seconds beside the requests served)."""
        return self._loading > 0

    @property
    def current(self) -> LoadedBundle | None:
        return self._current

    @property
    def rejected_versions(self) -> set[str]:
        return set(self._rejected)

    @property
    def fallback(self) -> bool:
        """True while the served version is not the one the alias names (it was rejected)."""
        current, champion = self._current, self.champion_version
        return current is not None and champion is not None and current.version != champion

    def _try(self, version: str) -> Any | None:
        """The loaded, checked bundle of ``version``; None (and remembered) when it fails."""
        self._loading += 1  # one refresh at a time (the lock): no lost update
        try:
            bundle = self._load(version)
            self._smoke(bundle)
        except Exception as exc:
            self._rejected.add(version)
            self._metrics.bundle_rejections.inc()
            self.last_error = f"bundle version {version} rejected: {exc}"
            logger.error(self.last_error)
            return None
        finally:
            self._loading -= 1
        return bundle

    def _swap(self, version: str, bundle: Any) -> None:
        current = self._current
        self._current = LoadedBundle(version, bundle)  # the atomic swap
        self._metrics.bundle_swaps.inc()
        if version.isdigit():
            self._metrics.served_version.set(int(version))
        logger.info("serving bundle version %s (was %s)", version,
                    current.version if current else None)

    def refresh(self) -> bool:
        """Checks the alias once; returns True when a new version was swapped in."""
        with self._lock:
            try:
                swapped = self._refresh()
            finally:
                self._metrics.bundle_fallback.set(1 if self.fallback else 0)
            return swapped

    def _refresh(self) -> bool:
        try:
            version = self._resolve()
        except Exception as exc:  # registry down: keep serving what we have
            self.last_error = f"cannot resolve alias: {exc}"
            logger.warning(self.last_error)
            return False
        self.champion_version = version
        current = self._current
        if version is None:
            return False
        if current is not None and current.version == version:
            return False
        if version not in self._rejected:
            bundle = self._try(version)
            if bundle is not None:
                self._swap(version, bundle)
                if self._last_good is not None:
                    self._last_good.write(version)
                return True
        if current is None:  # a broken champion and nothing to keep serving
            return self._fall_back(version)
        return False

    def _fall_back(self, broken: str) -> bool:
        version = self._last_good.read() if self._last_good is not None else None
        if version is None or version == broken or version in self._rejected:
            return False
        bundle = self._try(version)
        if bundle is None:
            return False
        self._swap(version, bundle)
        logger.warning("champion version %s is rejected: serving the last good version %s "
                       "until the alias names a version that passes its checks", broken, version)
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
