"""Typed platform settings: one model, three profiles, loaded once at the entrypoint.

Precedence, lowest to highest: the profile's embedded YAML (``profiles/<name>.yaml``), an
optional user YAML file, then environment variables ``RECSYS_<SECTION>__<KEY>``. Importing this
module has no side effects; call :func:`load_settings` in an entrypoint.

Mistakes fail at start-up in one line: an unknown key in a file, an unknown ``RECSYS_``
variable (``RECSYS_SERVNG__PORT``, ``RECSYS_REDIS_URL``), a URL that is not one
(``RECSYS_REDIS__URL=notaurl``), and in the ``services``/``k8s`` profiles a pseudonymization
key left at the development default. :func:`redacted` is what ``recsys config show`` prints.

Example:
    >>> settings = load_settings("local")
    >>> settings.redis.url
    'redis://127.0.0.1:6379/0'
"""

from __future__ import annotations

import difflib
import os
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from recsys_core import features as F
from recsys_core.errors import SettingsError

Profile = Literal["local", "services", "k8s"]
PROFILES: tuple[str, ...] = ("local", "services", "k8s")


ENV_PREFIX = "RECSYS_"
# RECSYS_ variables that are not settings (read by scripts and tests, never by the model).
OTHER_VARIABLES: dict[str, str] = {
    "RECSYS_MLFLOW_DB_URI": "infra/services/services.sh: MLflow's backend database",
    "RECSYS_REPO_DIR": "prefect.yaml: the checkout the worker pulls flows from",
    "RECSYS_SHARED_DIR": "tests: the shared datasets folder",
    "RECSYS_TEST_DIRECT_INGRESS": "tests/integration/serving: proxy instead of direct ingress",
}
DEVELOPMENT_KEY = "local-development-key"
# Settings that are credentials: never printed, never in a ConfigMap (the chart uses Secrets).
SECRET_NAMES = frozenset({"key", "password", "token", "secret"})
REDACTED = "***"


def is_secret(key: str) -> bool:
    """True for a setting that is a credential (``privacy.key``, ``*_password``, ...)."""
    last = key.rsplit(".", 1)[-1]
    return last in SECRET_NAMES or last.endswith(tuple(f"_{n}" for n in SECRET_NAMES))


def check_url(value: str, schemes: tuple[str, ...], what: str, host: bool = True) -> str:
    """Raises ``ValueError`` unless ``value`` is a URL with one of ``schemes`` (and a host)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not a {what} URL ({exc})") from None
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in schemes or "://" not in value or (host and not parts.hostname):
        forms = ", ".join(f"{s}://..." for s in schemes)
        raise ValueError(f"not a {what} URL (expected {forms})")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "recsys"  # every key the platform writes starts with this
    timeout_ms: int = Field(default=50, ge=1)  # per-call budget on the serving path

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("unix://"):
            return value
        return check_url(value, ("redis", "rediss"), "Redis")


class FeastSettings(_Section):
    project: str = "recsys"
    repo_path: Path = Path("feature_repo")
    registry: Literal["file", "sql"] = "file"
    registry_path: str = "registry.db"  # file path (relative to data_dir) or SQLAlchemy URL
    online_store: Literal["auto", "redis", "sqlite"] = "auto"  # auto: Redis if it answers
    offline_store: Literal["file"] = "file"
    retrieval_service: str = F.RETRIEVAL_V1
    ranking_service: str = F.RANKING_V1  # the training set joins its batch views
    # The service a bundle names (its retrieval + ranking inputs) and serving reads exactly.
    serving_service: str = F.RECOMMENDER_V1

    @field_validator("registry_path")
    @classmethod
    def _registry(cls, value: str) -> str:
        if "://" in value:  # a SQL registry's SQLAlchemy URL
            check_url(value, ("postgresql", "mysql", "sqlite"), "SQLAlchemy", host=False)
        return value


class MlflowSettings(_Section):
    tracking_uri: str = "sqlite:///{data_dir}/mlflow.db"
    artifact_location: str = "{data_dir}/mlartifacts"
    experiment: str = "recsys"
    model_name: str = "recsys-bundle"
    promotion_tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    popularity_margin: float = Field(default=0.10, ge=0.0)  # final recall@50 >= pop * (1 + m)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, value: str) -> str:
        if "://" not in value and ":" not in value:
            return value  # a local folder
        if value.startswith(("http://", "https://")):
            return check_url(value, ("http", "https"), "MLflow tracking")
        return check_url(value, ("sqlite", "postgresql", "mysql", "file", "databricks"),
                         "MLflow tracking", host=False)


class PrefectSettings(_Section):
    api_url: str | None = None  # None: Prefect's ephemeral API

    @field_validator("api_url")
    @classmethod
    def _api(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("http", "https"), "Prefect API")


class RaySettings(_Section):
    address: str | None = None  # None: start a local cluster; "auto", "host:port", "ray://..."
    head_port: int = Field(default=6385, ge=1024, le=65535)  # `serve up`'s local head (not 6379)
    # The address `serve up`'s local head listens on (GCS, raylet, Ray client server): loopback
    # by default; the machine's own IP opens the cluster (and its Jobs API) to the network.
    node_ip: str = "127.0.0.1"
    num_cpus: int | None = Field(default=None, ge=1)
    train_workers: int = Field(default=2, ge=1)
    # The ETL's validation, dedupe and writes on Ray (etl_ray) instead of in the flow's process:
    # for a cluster (k8s profile); on one 2-core box Ray Data's shuffle cost 5.8x the wall time.
    etl: bool = False
    use_gpu: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value in ("auto", "local"):
            return value
        url = value if "://" in value else f"ray://{value}"
        check_url(url, ("ray",), "Ray cluster")
        if urlsplit(url).port is None:
            raise ValueError("not a Ray cluster address (expected auto, host:port or "
                             "ray://host:port)")
        return value


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
    # Serve autoscaling on ongoing requests (rendered by serving/deployment.py into the Serve
    # config, `serve up` and the Helm chart).
    target_ongoing_requests: int = Field(default=1, ge=1)
    upscale_delay_s: float = Field(default=2.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    metrics_interval_s: float = Field(default=1.0, gt=0)  # replica -> controller pushes
    # ongoing requests averaged over this: at 3 s the sampled series of two replicas at a
    # 0.3x low phase jumped 0-2 from second to second and reset the downscale count (the spike
    # benchmark: 3 of 7 runs kept two replicas); at 10 s it read 0.1-0.4, and a spike (2-2.8)
    # still crossed the target within a second
    look_back_period_s: float = Field(default=10.0, gt=0)
    # Ray Serve's own limits sit far above the app's admission, so that every refusal is the
    # app's (fast, with Retry-After); Ray's backpressure only guards against a stalled replica.
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(default=256, ge=1)
    replica_cpus: float = Field(default=0.5, gt=0)  # 1 CPU per replica starves a 2-core node
    # Admission (serving/admission.py): a request is admitted while its predicted wait for the
    # hot path (work in flight x measured service time) stays within the budget; past
    # degrade_share of it admitted requests take the cheaper path (load_candidates candidates,
    # ranked if load_rank else in retrieval order; `degraded: ["load"]`); beyond it they get
    # 503 + Retry-After.
    queue_budget_ms: float = Field(default=10.0, gt=0)
    degrade_share: float = Field(default=0.5, ge=0, le=1)
    cheap_path: bool = True
    load_candidates: int = Field(default=100, ge=1, le=5000)
    load_rank: bool = False
    # Item features of each request's candidates: one Redis read per request behind a cache of
    # this many rows, each served for at most item_cache_ttl_s (also the cold-start lists'
    # refresh interval).
    item_cache_size: int = Field(default=100_000, ge=1)
    item_cache_ttl_s: float = Field(default=30.0, gt=0)
    # Set: each replica serves /metrics on this port of its own (one replica per pod: the
    # chart's direct ingress) and the public port answers 404 for /metrics, /docs, /openapi.json.
    admin_port: int | None = Field(default=None, ge=1, le=65535)


class PrivacySettings(_Section):
    pseudonymize: bool = False  # keyed-hash user ids before the lake and the stream
    # Set RECSYS_PRIVACY__KEY from a secret: the services and k8s profiles refuse the default.
    key: str = DEVELOPMENT_KEY


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

    @field_validator("serving_metrics_url")
    @classmethod
    def _metrics_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("http", "https"), "metrics")


class TrainingSettings(_Section):
    """Model and training knobs of ``recsys train`` (``--set KEY=VALUE``, a ``--config`` file,
    or ``RECSYS_TRAINING__<KEY>``). Unset (None) keeps the model code's own default.

    Each key is forwarded by name (:func:`recsys_models.workflow.training_config`) into the
    first of ``TrainConfig``, ``TwoTowerConfig`` and ``EncoderSpec`` that has a field of that
    name; ``ranker_<field>`` goes to ``RankerConfig``. A key no config has is refused there.
    """

    # TrainConfig: schedule and loop
    epochs: int | None = Field(default=None, ge=1)  # most retrieval epochs (early stopping)
    ranker_epochs: int | None = Field(default=None, ge=0)
    patience: int | None = Field(default=None, ge=1)  # epochs without a better validation recall
    min_improvement: float | None = Field(default=None, ge=0)  # share that resets the patience
    ranker_patience: int | None = Field(default=None, ge=1)  # ranker epochs w/o a better AUC
    batch_size: int | None = Field(default=None, ge=2)  # rows per step per worker
    ranker_batch_size: int | None = Field(default=None, ge=2)  # ranker phase (TrainConfig: 512)
    ranker_lr_scale: float | None = Field(default=None, gt=0)  # ranker's lr, sparse_lr x this (2)
    lr: float | None = Field(default=None, gt=0)  # peak learning rate, dense parameters
    sparse_lr: float | None = Field(default=None, gt=0)  # peak learning rate, embedding tables
    warmup: float | None = Field(default=None, ge=0, lt=1)  # share of steps warming up
    lr_floor: float | None = Field(default=None, ge=0, le=1)  # cosine decay ends here
    validation_fraction: float | None = Field(default=None, gt=0, lt=1)  # early-stopping split
    seed: int | None = None
    train_ranker: bool | None = None
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    in_memory_rows: int | None = Field(default=None, ge=0)  # per worker; larger data streams
    # TwoTowerConfig: retrieval model
    dim: int | None = Field(default=None, ge=2)  # output embedding size
    id_dim: int | None = Field(default=None, ge=2)
    meta_dim: int | None = Field(default=None, ge=1)
    hidden: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, gt=0)  # softmax temperature
    softmax: Literal["auto", "full", "sampled"] | None = None  # full: over the whole catalog
    full_softmax_max_items: int | None = Field(default=None, ge=1)  # auto: full up to this
    logq_correction: bool | None = None
    random_negatives: int | None = Field(default=None, ge=0)  # uniform catalog negatives/batch
    id_dropout: float | None = Field(default=None, ge=0, lt=1)
    seq_layers: int | None = Field(default=None, ge=0)  # self-attention blocks over the history
    seq_heads: int | None = Field(default=None, ge=1)
    seq_dropout: float | None = Field(default=None, ge=0, lt=1)
    # RankerConfig (ranker_<field>)
    ranker_emb_dim: int | None = Field(default=None, ge=1)
    ranker_hidden: int | None = Field(default=None, ge=1)
    ranker_watch_loss_weight: float | None = Field(default=None, ge=0)
    ranker_negatives: int | None = Field(default=None, ge=0)  # never-shown negatives per row
    ranker_negatives_from_top: int | None = Field(default=None, ge=1)
    ranker_retrieval_weight: float | None = None
    # EncoderSpec: inputs
    history_length: int | None = Field(default=None, ge=1)  # engagement sequence length
    use_item_age: bool | None = None  # off when item embeddings must not depend on query time
    user_buckets: int | None = Field(default=None, ge=1)
    item_buckets: int | None = Field(default=None, ge=1)
    creator_buckets: int | None = Field(default=None, ge=1)
    tag_buckets: int | None = Field(default=None, ge=1)
    # id tables sized from the training rows: the N most frequent ids get rows of their own
    item_vocab_cap: int | None = Field(default=None, ge=0)
    user_vocab_cap: int | None = Field(default=None, ge=0)
    vocab_min_count: int | None = Field(default=None, ge=1)
    tail_buckets: int | None = Field(default=None, ge=1)  # hashed rows for rarer and new ids

    def overrides(self) -> dict[str, Any]:
        """The keys that are set (not None), by name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EvaluationSettings(_Section):
    """How ``recsys train | evaluate`` and ``models promote`` split and judge a snapshot."""

    holdout: Literal["global", "per-user"] = "global"  # time quantile, or each user's last rows
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    baselines: bool = True  # tuned EASE and ALS next to popularity (validation split of train)
    ease_max_items: int = Field(default=10_000, ge=1)  # EASE on the N most engaged items
    chunk_users: int = Field(default=256, ge=1)  # users at once (final list: x 500 candidates)
    # Holdout users evaluated: all (None), or this many chosen by a hash of the user id (the
    # same users for every model and run on one holdout), for holdouts too large to score
    # whole in the time a run has (bench_scale at 1M items: ~64 ms per user, 15.9k users).
    max_users: int | None = Field(default=None, ge=1)


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
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

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
    text = resources.files("recsys_core").joinpath(f"profiles/{profile}.yaml").read_text()
    return _read_yaml(f"profiles/{profile}.yaml", text)


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown setting {key!r} (remove it or check its spelling)"
    shown = REDACTED if is_secret(key) else _redact_value(error.get("input"))
    return f"invalid setting {key!r} = {shown!r}: {error['msg']}"


def _env_setting(name: str) -> bool:
    """Whether ``RECSYS_<name>`` names a setting (``FIELD`` or ``SECTION__KEY``)."""
    parts = name.lower().split("__")
    field = Settings.model_fields.get(parts[0])
    if field is None or len(parts) > 2:
        return False
    if len(parts) == 1:
        return True
    section = field.annotation
    return isinstance(section, type) and issubclass(section, BaseModel) \
        and parts[1] in section.model_fields


def _env_names() -> list[str]:
    names = [f"{ENV_PREFIX}{f}".upper() for f in Settings.model_fields]
    for field, info in Settings.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names += [f"{ENV_PREFIX}{field}__{k}".upper() for k in section.model_fields]
    return names


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Raises when a ``RECSYS_`` variable names no setting (a typo would be ignored).

    Raises:
        SettingsError: One line naming the variable and the closest setting's variable.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(
        name for name in env
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in OTHER_VARIABLES
        and not _env_setting(name[len(ENV_PREFIX):]))
    if not unknown:
        return
    known = _env_names()
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
        hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise SettingsError(
        f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
        f"settings are {ENV_PREFIX}<KEY> or {ENV_PREFIX}<SECTION>__<KEY>; unset or rename it")


def check_secrets(settings: Settings) -> None:
    """Refuses the development pseudonymization key outside the ``local`` profile.

    Raises:
        SettingsError: ``services``/``k8s`` pseudonymize with the default (or an empty) key.
    """
    privacy = settings.privacy
    if settings.profile == "local" or not privacy.pseudonymize:
        return
    if privacy.key in (DEVELOPMENT_KEY, "") or len(privacy.key) < 16:
        raise SettingsError(
            f"invalid setting 'privacy.key': the {settings.profile} profile pseudonymizes user "
            f"ids and needs a real key of at least 16 characters: set RECSYS_PRIVACY__KEY from "
            f"a secret (the default {DEVELOPMENT_KEY!r} is for the local profile only)")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str) and "://" in value and "@" in value:
        try:
            parts = urlsplit(value)
        except ValueError:
            return value
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
            return parts._replace(netloc=netloc).geturl()
    return value


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with credentials (:func:`is_secret`, URL passwords) masked."""

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: REDACTED if is_secret(f"{prefix}{k}") and v
                    else walk(v, f"{prefix}{k}.") for k, v in node.items()}
        return _redact_value(node)

    return dict(walk(settings.model_dump(mode="json"), ""))


def load_settings(profile: str | None = None, config_file: Path | None = None,
                  secrets: bool = True) -> Settings:
    """Loads settings for a profile.

    Args:
        profile: ``local``, ``services`` or ``k8s``; defaults to ``$RECSYS_PROFILE`` or ``local``.
        config_file: Optional YAML file whose keys override the profile's defaults.
        secrets: Check the credentials a running service needs (:func:`check_secrets`);
            False only to inspect or render a profile (``recsys deploy render-config``).

    Returns:
        The validated, frozen settings.

    Raises:
        SettingsError: A value is invalid, a key or a ``RECSYS_`` variable unknown, or a
            profile's credentials missing; the message names the key, in one line.
    """
    check_environment()
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
        settings = Settings(**values)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
    if secrets:
        check_secrets(settings)
    return settings


def with_overrides(settings: Settings, assignments: list[str],
                   section: str = "training") -> Settings:
    """``settings`` with ``KEY=VALUE`` assignments applied (``recsys train --set``).

    A key is a dotted settings path (``evaluation.holdout``) or, without a dot, a key of
    ``section``; the value is read as YAML (``0.05``, ``true``, ``per-user``). The result is
    validated like a config file, so an unknown key or a bad value fails the same way.

    Raises:
        SettingsError: An assignment without ``=``, an unknown key or an invalid value; one
            line naming the key.
    """
    values = settings.model_dump()
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(f"invalid --set {assignment!r}: expected KEY=VALUE, e.g. "
                                f"{section}.epochs=12")
        path = key.split(".") if "." in key else [section, key]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = values
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise SettingsError(f"unknown setting {key!r} (remove it or check its spelling)")
            node = node[part]
        node[path[-1]] = value
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
