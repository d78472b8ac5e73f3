"""Labelled impressions per arm, from the impression log and the lake.

The served log (``landing/served``) names each response's experiment, arm, version, degraded
stages and latency; the ETL has carried the same impressions into the lake as ``impression``
events (``request_id``, ``model_version``), next to the clients' clicks and watches; the
delayed label join (:func:`recsys_pipelines.training_set.join_labels`, window
``labels.window_s``) labels those whose window has closed. Joining the two on
``(request_id, item_id)`` gives one row per served, labelled impression of the experiment;
impressions still waiting for their window (or for the ETL) are counted as pending.

Shadow mode adds ``landing/shadow``: the treatment's ranking of each shadowed request, scored
against what the user then clicked among the items the champion showed (offline-on-live).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from recsys_core.settings import Settings
from recsys_platform.experiments.definition import Experiment
from recsys_platform.experiments.stats import COLUMNS, Report, analyse

logger = logging.getLogger(__name__)

_SERVED_COLUMNS = ["request_id", "user_id", "item_id", "position", "bundle_version",
                   "served_at", "experiment_id", "arm", "degraded", "latency_ms"]


def read_log(folder: Path, exp: Experiment) -> pd.DataFrame:
    """Rows of ``exp`` in an impression-log folder (``landing/served`` or ``landing/shadow``)
    from the day it started on."""
    import pyarrow.dataset as pads

    from recsys_core.contracts import SERVED_SCHEMA

    first_day = exp.started.date().isoformat()
    files = sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith(".")
                   and p.parent.name.removeprefix("date=") >= first_day)
    if not files:
        return pd.DataFrame(columns=_SERVED_COLUMNS)
    # The schema given: files written before experiments existed read their columns as null.
    dataset = pads.dataset(files, schema=SERVED_SCHEMA, format="parquet")
    return dataset.to_table(columns=_SERVED_COLUMNS,
                            filter=pads.field("experiment_id") == exp.id).to_pandas()


def labelled_rows(settings: Settings, exp: Experiment, served: pd.DataFrame,
                  as_of: datetime) -> tuple[pd.DataFrame, int]:
    """The served rows with their labels (``clicked``, ``watch_time_ms``) from the lake, and
    how many served impressions are not labelled yet (window open, or not in the lake)."""
    from recsys_pipelines.etl import read_lake_events
    from recsys_pipelines.training_set import join_labels

    if served.empty:
        return pd.DataFrame(columns=list(COLUMNS)), 0
    events = read_lake_events(settings.lake_dir, start=exp.started.date())
    labels = join_labels(events, settings.labels.window, as_of=as_of,
                         with_request_id=True).impressions
    labels = labels[["request_id", "item_id", "clicked", "watch_time_ms"]]
    rows = served.merge(labels, on=["request_id", "item_id"], how="inner")
    return rows[list(COLUMNS)], int(len(served) - len(rows))


def shadow_metrics(served: pd.DataFrame, labelled: pd.DataFrame,
                   shadow: pd.DataFrame) -> dict[str, float]:
    """Offline-on-live: the treatment's shadow ranking against what users clicked.

    ``served``: the experiment's served rows (``request_id, item_id, position``);
    ``labelled``: ``request_id, item_id, clicked`` of those whose label window closed;
    ``shadow``: the treatment's rankings (``request_id, item_id, position``).

    For every shadowed request with at least one click among the items the champion showed:
    ``control_mrr`` / ``treatment_mrr`` are the mean reciprocal rank (1 / (position + 1)) of the
    clicked items in the served list and in the treatment's list (0 where the treatment did
    not rank the item in its top-k); ``treatment_hit_rate`` is the share of clicked items the
    treatment's top-k also holds; ``overlap`` the mean share of served items the treatment's
    list holds too (over every shadowed request).
    """
    out: dict[str, float] = {"shadow_requests": float(shadow["request_id"].nunique())}
    if shadow.empty:
        return out
    shadow_pos = shadow[["request_id", "item_id", "position"]].rename(
        columns={"position": "shadow_position"})
    both = served[served["request_id"].isin(shadow["request_id"])]
    overlap = both.merge(shadow_pos, on=["request_id", "item_id"], how="left")
    out["overlap"] = float(overlap.groupby("request_id")["shadow_position"]
                           .apply(lambda s: s.notna().mean()).mean()) if len(overlap) else 0.0
    clicked = labelled[(labelled["clicked"] == 1)
                       & labelled["request_id"].isin(shadow["request_id"])]
    clicked = clicked.merge(served[["request_id", "item_id", "position"]],
                            on=["request_id", "item_id"], how="left")
    clicked = clicked.merge(shadow_pos, on=["request_id", "item_id"], how="left")
    out["clicked_requests"] = float(clicked["request_id"].nunique())
    out["clicks"] = float(len(clicked))
    if len(clicked):
        out["control_mrr"] = float((1.0 / (clicked["position"] + 1)).mean())
        rr = 1.0 / (clicked["shadow_position"] + 1)
        out["treatment_mrr"] = float(rr.fillna(0.0).mean())
        out["treatment_hit_rate"] = float(clicked["shadow_position"].notna().mean())
    return out


def evaluate(settings: Settings, exp: Experiment, as_of: datetime | None = None) -> Report:
    """The experiment's report as of ``as_of`` (default: now)."""
    as_of = as_of or datetime.now(UTC)
    served = read_log(settings.landing_dir / "served", exp)
    rows, pending = labelled_rows(settings, exp, served, as_of)
    report = analyse(exp, rows)
    report.pending, report.as_of = pending, as_of.isoformat()
    if exp.mode == "shadow":
        shadow = read_log(settings.landing_dir / "shadow", exp)
        report.shadow = shadow_metrics(served, rows[["request_id", "item_id", "clicked"]],
                                       shadow)
    logger.info("experiment %s as of %s: %d labelled impressions, %d pending", exp.id,
                as_of.isoformat(), len(rows), pending)
    return report

