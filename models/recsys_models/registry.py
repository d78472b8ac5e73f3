"""MLflow tracking and registry: log a training run, register its bundle, gate promotions.

One registered model version per bundle (a pyfunc model whose artifacts hold the whole bundle
directory), of ``settings.mlflow.model_name``. A new version gets the alias ``challenger``;
:func:`promote` moves ``champion`` to it only if it is not worse than the current champion on
the same holdout beyond ``settings.mlflow.promotion_tolerance`` (relative). Every gate decision
is recorded as tags on the version: who, what (metrics, previous champion), why, when. Setting
the ``champion`` alias by hand in the MLflow UI stays possible; :func:`load_alias` follows it.
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from recsys_core.features import USER_HISTORY
from recsys_core.settings import Settings
from recsys_models.baselines import Baselines, tuned_baselines
from recsys_models.bundle import Bundle, load_bundle, save_bundle, serving_memory_bytes
from recsys_models.errors import AliasNotFoundError
from recsys_models.evaluate import EvaluationReport, evaluate_bundle
from recsys_models.model_card import describe_gate, describe_version
from recsys_models.provenance import DIGEST_TAG, bundle_digest

logger = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
GATED_METRICS: tuple[str, ...] = ("two_tower/recall@50", "ranker/auc")  # higher is better
BASELINE_METRIC = "final/recall@50"  # what users receive, against popularity's
POPULARITY_METRIC = "popularity/recall@50"
# Shown next to the gate (tags, model card), not gated: the tuned baselines on the same holdout.
SHOWN_BASELINES: tuple[str, ...] = ("ease/recall@50", "als/recall@50", "final/recall@50_vs_ease",
                                    "final/recall@50_vs_als")
_REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "hnswlib", "mlflow", "scikit-learn")


def metric_key(name: str) -> str:
    """MLflow metric names may not contain '@': ``recall@50`` is logged as ``recall_at_50``."""
    return name.replace("@", "_at_")


def pip_requirements() -> list[str]:
    """Explicit pins (MLflow's inference of requirements costs seconds per log_model)."""
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@contextmanager
def tracking(uri: str) -> Iterator[MlflowClient]:
    """Points MLflow at ``uri`` for the duration of the block (restores the previous URI)."""
    previous, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)


class BundleModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
    """Pyfunc wrapper: input ``user_id`` + ``user_history`` (JSON list), output top-k rows."""

    bundle: Bundle | None = None

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        assert self.bundle is not None
        k = int((params or {}).get("k", 10))
        users = model_input.copy()
        users[USER_HISTORY] = [json.loads(h) if isinstance(h, str) else list(h or [])
                                 for h in users.get(USER_HISTORY, [[]] * len(users))]
        return self.bundle.recommend(users, k)


# Logged as code (no pickled object); MLflow runs it on load. The example is checked at logging.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = pd.DataFrame({"user_id": ["u0"], USER_HISTORY: [json.dumps([])]})


def pyfunc_signature() -> ModelSignature:
    """Input ``user_id`` + ``user_history`` (JSON list), param ``k``, output the top-k rows."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec("string", USER_HISTORY)]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "rank"),
                        ColSpec("string", "item_id"), ColSpec("double", "score"),
                        ColSpec("double", "p_click"), ColSpec("double", "watch_time_ms_pred")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]))


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    name = settings.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = settings.path(settings.mlflow.artifact_location)
    return str(client.create_experiment(name, artifact_location=location))


@dataclass
class Registered:
    """A registered bundle version."""

    name: str
    version: str
    run_id: str
    uri: str


def bundle_size_stats(bundle: Bundle, bundle_dir: Path) -> dict[str, float]:
    """Build time, on-disk size and a replica's memory for the bundle (logged with it)."""
    index_bytes = sum(f.stat().st_size for f in (bundle_dir / "index").iterdir())
    return {**bundle.build_stats, "index_bytes": float(index_bytes),
            "bundle_bytes": float(sum(f.stat().st_size for f in bundle_dir.rglob("*")
                                      if f.is_file())),
            "replica_memory_estimate_bytes": float(serving_memory_bytes(bundle, index_bytes))}


# What MLflow prints to stderr itself (``eprint``, not a logger) when it registers a version;
# register_bundle logs the outcome, so these become DEBUG records.
_REGISTRY_NOTICES = re.compile(r"^(Successfully registered model|Created version|Registered model "
                               r".* already exists)")


@contextmanager
def registry_notices() -> Iterator[None]:
    """Turns MLflow's registration notices printed inside the block into DEBUG records; any
    other line it wrote to stderr is passed on as a WARNING record."""
    buffer = io.StringIO()
    try:
        with redirect_stderr(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                level = logging.DEBUG if _REGISTRY_NOTICES.match(line) else logging.WARNING
                logger.log(level, "mlflow: %s", line.rstrip())


def register_bundle(
    settings: Settings, bundle: Bundle, *, params: dict[str, Any] | None = None,
    history: list[dict[str, float]] | None = None, report: EvaluationReport | None = None,
    run_name: str | None = None,
) -> Registered:
    """Logs a run (params, per-epoch metrics, evaluation, plots) and registers the bundle.

    The new version gets the alias ``challenger`` and tags ``feature_service``,
    ``snapshot_id`` and ``bundle_version``.
    """
    name = settings.mlflow.model_name
    with tracking(settings.mlflow_tracking_uri) as client:
        exp_id = _experiment_id(client, settings)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run, \
                tempfile.TemporaryDirectory() as tmp:
            mlflow.log_params({metric_key(k): str(v)[:500] for k, v in (params or {}).items()})
            mlflow.set_tags({"feature_service": bundle.feature_service,
                             "snapshot_id": bundle.snapshot_id, "bundle_version": bundle.version})
            for h in history or []:
                mlflow.log_metrics({f"train/{metric_key(k)}": v for k, v in h.items()
                                    if k != "epoch" and v == v}, step=int(h["epoch"]))
            if report is not None:
                mlflow.log_metrics({metric_key(k): v for k, v in report.metrics.items()
                                    if v == v})
                for fname, fig in report.figures().items():
                    mlflow.log_figure(fig, f"plots/{fname}")
                bundle.metrics = dict(report.metrics)
            bundle_dir = save_bundle(bundle, Path(tmp) / "bundle")
            mlflow.log_metrics({f"bundle/{k}": float(v)
                                for k, v in bundle_size_stats(bundle, bundle_dir).items()})
            digest = bundle_digest(bundle_dir)  # verified by serving (provenance.load_verified)
            with registry_notices():
                info = mlflow.pyfunc.log_model(
                    name="bundle", python_model=str(PYFUNC_CODE),
                    artifacts={"bundle": str(bundle_dir)}, pip_requirements=pip_requirements(),
                    signature=pyfunc_signature(), input_example=(INPUT_EXAMPLE, {"k": 10}),
                    registered_model_name=name,
                )
        version = str(info.registered_model_version)
        for key, value in ((DIGEST_TAG, digest), ("feature_service", bundle.feature_service),
                           ("snapshot_id", bundle.snapshot_id),
                           ("bundle_version", bundle.version)):
            client.set_model_version_tag(name, version, key, value)
        if report is not None:
            for metric in (*GATED_METRICS, BASELINE_METRIC, POPULARITY_METRIC,
                           *(m for m in SHOWN_BASELINES if m in report.metrics)):
                client.set_model_version_tag(name, version, metric_key(metric),
                                             f"{report.metrics.get(metric, float('nan')):.6f}")
        client.set_registered_model_alias(name, CHALLENGER, version)
        describe_version(client, name, version, bundle, report.metrics if report else {},
                         run.info.run_id)
    logger.info("registered %s version %s (run %s) as %s", name, version, run.info.run_id,
                CHALLENGER)
    return Registered(name, version, run.info.run_id, f"models:/{name}/{version}")


def alias_version(settings: Settings, alias: str) -> str:
    """The version number behind an alias.

    Raises:
        AliasNotFoundError: No version carries the alias.
    """
    name = settings.mlflow.model_name
    with tracking(settings.mlflow_tracking_uri) as client:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            raise AliasNotFoundError(name, alias) from None


def load_alias(settings: Settings, alias: str) -> Bundle:
    """Loads the bundle behind ``models:/<model_name>@<alias>``."""
    alias_version(settings, alias)  # a clear error when missing
    uri = f"models:/{settings.mlflow.model_name}@{alias}"
    return load_bundle(uri, tracking_uri=settings.mlflow_tracking_uri)


@dataclass
class PromotionResult:
    """What the gate decided, and on which numbers."""

    promoted: bool
    challenger: str
    champion: str | None
    reasons: list[str] = field(default_factory=list)
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)




def baseline_gate(challenger: dict[str, float], margin: float) -> list[str]:
    """Reasons to refuse a version that does not beat popularity by ``margin`` (relative) on
    the same holdout; applies to every version, the first one included."""
    new = challenger.get(BASELINE_METRIC, float("nan"))
    pop = challenger.get(POPULARITY_METRIC, float("nan"))
    if new == new and pop == pop and new >= pop * (1.0 + margin):
        return []
    return [f"{BASELINE_METRIC} {new:.4f} < {POPULARITY_METRIC} {pop:.4f} + {margin:.0%} "
            f"(needs >= {pop * (1.0 + margin):.4f})"]


def gate(challenger: dict[str, float], champion: dict[str, float], tolerance: float,
         metrics: tuple[str, ...] = GATED_METRICS) -> list[str]:
    """Reasons to refuse: each gated metric where challenger < champion * (1 - tolerance)."""
    reasons = []
    for m in metrics:
        new, old = challenger.get(m, float("nan")), champion.get(m, float("nan"))
        if old == old and not new >= old * (1.0 - tolerance):
            reasons.append(f"{m} {new:.4f} < champion {old:.4f} - {tolerance:.0%}")
    return reasons


def promote(
    settings: Settings, train: pd.DataFrame, holdout: pd.DataFrame, *, why: str,
    who: str | None = None, force: bool = False, baselines: Baselines | None = None,
) -> PromotionResult:
    """Evaluates challenger and champion on the same holdout and moves ``champion`` if the
    challenger is not worse beyond the tolerance (or ``force``). Records the decision as tags.

    The challenger must beat popularity by ``settings.mlflow.popularity_margin``; the tuned
    EASE and ALS (``baselines``, else tuned here when ``settings.evaluation.baselines``) are
    evaluated on the same holdout and shown in the gate's tags and the model card, not gated.

    Raises:
        AliasNotFoundError: There is no challenger.
    """
    name = settings.mlflow.model_name
    who = who or getpass.getuser()
    challenger = alias_version(settings, CHALLENGER)
    try:
        champion: str | None = alias_version(settings, CHAMPION)
    except AliasNotFoundError:
        champion = None
    result = PromotionResult(False, challenger, champion)
    if baselines is None:
        baselines = (tuned_baselines(train, protocol=settings.evaluation.holdout,
                                     ease_max_items=settings.evaluation.ease_max_items)
                     if settings.evaluation.baselines else Baselines())
    chunk, users = settings.evaluation.chunk_users, settings.evaluation.max_users
    result.challenger_metrics = evaluate_bundle(load_alias(settings, CHALLENGER), train,
                                                holdout, extra=baselines.recommenders,
                                                chunk_users=chunk, max_users=users).metrics
    result.reasons = baseline_gate(result.challenger_metrics,
                                   settings.mlflow.popularity_margin)
    if champion is not None and champion != challenger:
        result.champion_metrics = evaluate_bundle(load_alias(settings, CHAMPION), train,
                                                  holdout, chunk_users=chunk,
                                                  max_users=users).metrics
        result.reasons += gate(result.challenger_metrics, result.champion_metrics,
                               settings.mlflow.promotion_tolerance)
    result.promoted = force or not result.reasons
    now = datetime.now(UTC).isoformat()
    what = {m: {"challenger": result.challenger_metrics.get(m),
                "champion": result.champion_metrics.get(m)}
            for m in (*GATED_METRICS, BASELINE_METRIC, POPULARITY_METRIC)}
    shown = {m: result.challenger_metrics[m] for m in SHOWN_BASELINES
             if m in result.challenger_metrics}
    tags = {
        "gate.decision": "promoted" if result.promoted else "refused",
        "gate.who": who, "gate.why": why, "gate.when": now,
        "gate.what": json.dumps({"metrics": what, "previous_champion": champion,
                                 "forced": force, "refusals": result.reasons}),
        "gate.baselines": json.dumps(shown),
    }
    with tracking(settings.mlflow_tracking_uri) as client:
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger, key, value[:5000])
        describe_gate(client, name, challenger, tags, what, champion, result.reasons,
                      baselines=shown)
        if result.promoted:
            client.set_registered_model_alias(name, CHAMPION, challenger)
            for key, value in (("promoted_by", who), ("promoted_at", now),
                               ("promotion_reason", why)):
                client.set_model_version_tag(name, challenger, key, value)
    logger.info("gate %s version %s (champion was %s): %s", tags["gate.decision"], challenger,
                champion, "; ".join(result.reasons) or "ok")
    return result


def list_versions(settings: Settings) -> pd.DataFrame:
    """Registered versions, newest first, with aliases and the main tags."""
    name = settings.mlflow.model_name
    cols = ["version", "aliases", "created", "snapshot_id", "feature_service",
            *GATED_METRICS, BASELINE_METRIC, POPULARITY_METRIC, *SHOWN_BASELINES[:2],
            "promoted_by", "promotion_reason"]
    with tracking(settings.mlflow_tracking_uri) as client:
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return pd.DataFrame(columns=cols)
        aliases: dict[str, list[str]] = {}
        try:
            for alias, ver in client.get_registered_model(name).aliases.items():
                aliases.setdefault(str(ver), []).append(alias)
        except MlflowException:
            pass
    rows = []
    for v in versions:
        rows.append({"version": str(v.version), "aliases": ",".join(aliases.get(str(v.version),
                                                                                 [])),
                     "created": pd.Timestamp(v.creation_timestamp, unit="ms", tz="UTC"),
                     **{c: v.tags.get(metric_key(c), "") for c in cols[3:]}})
    frame = pd.DataFrame(rows, columns=cols)
    return frame.sort_values("version", key=lambda s: s.astype(int), ascending=False)
