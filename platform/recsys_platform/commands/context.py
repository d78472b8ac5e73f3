"""The settings the CLI loaded at start-up, for command modules (no import of cli.py)."""

from __future__ import annotations

from recsys_platform.settings import Settings, load_settings

_loaded: list[Settings] = []


def set_settings(settings: Settings) -> None:
    _loaded[:] = [settings]


def current_settings() -> Settings:
    """The settings of this CLI invocation (loads the default profile when none was set)."""
    if not _loaded:
        _loaded.append(load_settings())
    return _loaded[0]
