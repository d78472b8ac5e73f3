"""Typed platform settings: one model, three profiles, loaded once at the entrypoint.

Precedence, lowest to highest: the profile's embedded YAML (``profiles/<name>.yaml``), an
optional user YAML file, then environment variables ``RECSYS_<SECTION>__<KEY>``. Importing this
module has no side effects; call :func:`load_settings` in an entrypoint.

Example:
    >>> settings = load_settings("local")
    >>> settings.redis.url
    'redis://127.0.0.1:6379/0'
"""

from __future__ import annotations

import os
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from recsys_platform.errors import SettingsError

Profile = Literal["local", "services", "k8s"]
PROFILES: tuple[str, ...] = ("local", "services", "k8s")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "recsys"  # every key the platform writes starts with this
    timeout_ms: int = Field(default=50, ge=1)  # per-call budget on the serving path


class FeastSettings(_Section):
    project: str = "recsys"
    repo_path: Path = Path("feature_repo")
    registry: Literal["file", "sql"] = "file"
    registry_path: str = "registry.db"  # file path (relative to data_dir) or SQLAlchemy URL
    online_store: Literal["auto", "redis", "sqlite"] = "auto"  # auto: Redis if it answers
    offline_store: Literal["file"] = "file"
    retrieval_service: str = "retrieval_v1"
    ranking_service: str = "ranking_v1"


class MlflowSettings(_Section):
    tracking_uri: str = "sqlite:///{data_dir}/mlflow.db"
    artifact_location: str = "{data_dir}/mlartifacts"
    experiment: str = "recsys"
    model_name: str = "recsys-bundle"
    promotion_tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    popularity_margin: float = Field(default=0.10, ge=0.0)  # final recall@50 >= pop * (1 + m)


class PrefectSettings(_Section):
    api_url: str | None = None  # None: Prefect's ephemeral API


class RaySettings(_Section):
    address: str | None = None  # None: start a local cluster
    head_port: int = Field(default=6385, ge=1024, le=65535)  # `serve up`'s local head (not 6379)
    num_cpus: int | None = Field(default=None, ge=1)
    train_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False


class FlinkSettings(_Section):
    source: Literal["file", "kafka"] = "file"
    stream_dir: str = "{data_dir}/landing/stream"
    checkpoint_dir: str = "{data_dir}/flink/checkpoints"
    checkpoint_interval_ms: int = Field(default=5_000, ge=100)
    parallelism: int = Field(default=1, ge=1)
    max_out_of_orderness_s: int = Field(default=30, ge=0)
    allowed_lateness_s: int = Field(default=300, ge=0)
    dedupe_window_s: int = Field(default=900, ge=1)  # event_id dedupe memory (stream job)
    kafka_bootstrap: str = "kafka:9092"
    kafka_topic: str = "events"
    kafka_group: str = "recsys-stream"
    kafka_offsets: Literal["earliest", "latest", "committed"] = "committed"


class ServingSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    candidates: int = Field(default=500, ge=1, le=5000)
    poll_interval_s: float = Field(default=10.0, gt=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: int = Field(default=8, ge=1)
    max_queued_requests: int = Field(default=64, ge=1)


class PrivacySettings(_Section):
    pseudonymize: bool = False  # keyed-hash user ids before the lake and the stream
    key: str = "local-development-key"  # set RECSYS_PRIVACY__KEY from a secret in production


class LabelSettings(_Section):
    """The delayed label join ("log and wait") of served impressions."""

    window_s: int = Field(default=3_600, ge=1)  # a click/watch counts this long after an impression

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_s)


class MonitoringSettings(_Section):
    """Thresholds of the monitoring flow; a value past its threshold fails the run."""

    experiment: str = "monitoring"  # MLflow experiment of the monitoring runs
    sample_users: int = Field(default=500, ge=1)  # online feature rows read per entity kind
    sample_items: int = Field(default=500, ge=1)
    psi_bins: int = Field(default=10, ge=2)  # quantile bins of the PSI
    max_feature_psi: float = Field(default=0.2, gt=0)  # training snapshot vs online, per feature
    max_score_psi: float = Field(default=0.2, gt=0)  # served scores: this window vs the previous
    window_hours: float = Field(default=24.0, gt=0)  # served-log window (coverage, scores)
    min_catalog_coverage: float = Field(default=0.05, ge=0, le=1)  # share of items served
    max_popularity_gini: float = Field(default=0.95, ge=0, le=1)  # skew of served items
    max_stream_lag_s: float = Field(default=900.0, gt=0)  # now - newest stream window end
    require_stream: bool = False  # True: no stream counters in Redis is a breach, not a skip
    serving_metrics_url: str | None = None  # e.g. http://127.0.0.1:8000/metrics; None: skip
    max_error_rate: float = Field(default=0.01, ge=0, le=1)  # 5xx per request
    max_fallback_rate: float = Field(default=0.05, ge=0)  # degraded stages per request
    textfile: str = "{data_dir}/monitoring/recsys_monitoring.prom"  # node-exporter textfile


class Settings(BaseSettings):
    """The whole platform configuration. Unknown keys are errors at every level."""

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    profile: Profile = "local"
    data_dir: Path = Path("data")
    redis: RedisSettings = RedisSettings()
    feast: FeastSettings = FeastSettings()
    mlflow: MlflowSettings = MlflowSettings()
    prefect: PrefectSettings = PrefectSettings()
    ray: RaySettings = RaySettings()
    flink: FlinkSettings = FlinkSettings()
    serving: ServingSettings = ServingSettings()
    privacy: PrivacySettings = PrivacySettings()
    labels: LabelSettings = LabelSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML passed in as init kwargs.
        return env_settings, init_settings

    def path(self, template: str) -> str:
        """Expands ``{data_dir}`` in a settings string to the absolute data directory."""
        return template.format(data_dir=self.data_dir.resolve().as_posix())

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.path(self.mlflow.tracking_uri)

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"


def _read_yaml(source: str | Path, text: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"{source}: expected a mapping at the top level")
    return loaded


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_defaults(profile: str) -> dict[str, Any]:
    """Returns the embedded YAML of a profile as a dict."""
    if profile not in PROFILES:
        allowed = ", ".join(repr(p) for p in PROFILES)
        raise SettingsError(f"invalid setting 'profile' = {profile!r}: allowed values: {allowed}")
    text = resources.files("recsys_platform").joinpath(f"profiles/{profile}.yaml").read_text()
    return _read_yaml(f"profiles/{profile}.yaml", text)


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown setting {key!r} (remove it or check its spelling)"
    return f"invalid setting {key!r} = {error.get('input')!r}: {error['msg']}"


def load_settings(profile: str | None = None, config_file: Path | None = None) -> Settings:
    """Loads settings for a profile.

    Args:
        profile: ``local``, ``services`` or ``k8s``; defaults to ``$RECSYS_PROFILE`` or ``local``.
        config_file: Optional YAML file whose keys override the profile's defaults.

    Returns:
        The validated, frozen settings.

    Raises:
        SettingsError: A value is invalid or a key unknown; the message names the key.
    """
    name = profile or os.environ.get("RECSYS_PROFILE", "local")
    values = profile_defaults(name)
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        values = _merge(values, _read_yaml(config_file, config_file.read_text()))
    values["profile"] = name
    if os.environ.get("REDIS_URL"):  # the conventional variable; RECSYS_REDIS__URL still wins
        values["redis"] = {**values.get("redis", {}), "url": os.environ["REDIS_URL"]}
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
