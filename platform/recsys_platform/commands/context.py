"""The settings the CLI loaded at start-up, for command modules (no import of cli.py)."""

from __future__ import annotations

from pathlib import Path

from recsys_core.settings import Settings, load_settings

_loaded: list[Settings] = []
_config_file: list[Path] = []


def set_settings(settings: Settings, config_file: Path | None = None) -> None:
    """Records this invocation's settings and the YAML file (``--config``) they came from."""
    _loaded[:] = [settings]
    _config_file[:] = [config_file] if config_file is not None else []


def current_settings() -> Settings:
    """The settings of this CLI invocation (loads the default profile when none was set)."""
    if not _loaded:
        _loaded.append(load_settings())
    return _loaded[0]


def current_config_file() -> Path | None:
    """The top-level ``--config`` file of this invocation, if one was given."""
    return _config_file[0] if _config_file else None


def settings_with(config_file: Path | None) -> tuple[Settings, Path | None]:
    """The settings for a command that takes its own ``--config`` (it wins over the top-level
    one), and the file processes started for the command must load too (e.g. Serve replicas)."""
    if config_file is None:
        return current_settings(), current_config_file()
    return load_settings(current_settings().profile, config_file), config_file
