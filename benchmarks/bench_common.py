"""What several benchmarks share: a platform's working folder (settings file and Feast repo).

Imported by the benchmark scripts, which run with ``benchmarks/`` first on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO_DEFINITIONS = Path(__file__).resolve().parents[1] / "feature_repo" / "definitions.py"


def write_platform_config(workdir: Path, redis_url: str, project: str) -> Path:
    """``workdir/settings.yaml`` over the local profile (data under ``workdir/data``, Feast
    project ``project`` online in ``redis_url``, 500 candidates per request) and a copy of the
    Feast definitions in ``workdir/feature_repo``; returns the settings file."""
    config = {"data_dir": str(workdir / "data"), "redis": {"url": redis_url},
              "feast": {"project": project, "online_store": "redis",
                        "repo_path": str(workdir / "feature_repo"),
                        "registry_path": str(workdir / "data" / "feast" / "registry.db")},
              "serving": {"candidates": 500, "poll_interval_s": 30}}
    (workdir / "feature_repo").mkdir(parents=True, exist_ok=True)
    (workdir / "feature_repo" / "definitions.py").write_text(REPO_DEFINITIONS.read_text())
    config_file = workdir / "settings.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file
