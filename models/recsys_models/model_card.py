"""Model cards: the descriptions the MLflow UI shows for the registered model and each version.

A version's card says what the bundle holds, which training snapshot it learned from, its
metrics next to the popularity, EASE and ALS baselines, and (once
:func:`~recsys_models.registry.promote` ran) the gate's decision. The text builders are
pure; :func:`describe_version` and :func:`describe_gate` write them through an
:class:`~mlflow.tracking.MlflowClient`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

GATE_HEADING = "### Gate decision"
BASELINES: tuple[tuple[str, str], ...] = (("popularity", "popularity"), ("ease", "EASE"),
                                          ("als", "ALS"))
# (label, this version's key, the baselines' metric or None): the card's metrics table; a
# baseline's value is ``<baseline>/<metric>`` on the same holdout.
CARD_METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("served recall@50 (ranked)", "final/recall@50", "recall@50"),  # when evaluated
    ("served recall@10 (ranked)", "final/recall@10", "recall@10"),
    ("retrieval recall@50", "two_tower/recall@50", "recall@50"),
    ("retrieval ndcg@50", "two_tower/ndcg@50", "ndcg@50"),
    ("retrieval recall@10", "two_tower/recall@10", "recall@10"),
    ("ranker AUC", "ranker/auc", None),
    ("ranker GAUC", "ranker/gauc", None),
    ("ranker log loss", "ranker/logloss", None),
    ("ANN recall@100 vs exact", "ann/recall@100", None),
)


def model_description(name: str) -> str:
    """The registered model's description: what a version is and how the aliases work."""
    return (
        f"**{name}**: the recommender's serving bundle, one version per training run.\n\n"
        "Each version holds a two-tower retrieval model (user and item towers), the HNSW index "
        "of the item embeddings, a multi-task ranker (click-through + watch time), the feature "
        "encoders and the item catalog it was trained on. Each version's description is its "
        "model card: training snapshot, metrics next to the popularity, EASE and ALS "
        "baselines, the gate's decision.\n\n"
        "Aliases: `challenger` is the newest registered version; `champion` is the one Ray "
        "Serve replicas serve (they poll the alias and swap without a restart). "
        "`recsys models promote --why ...` moves `champion` through the gate and records "
        "`gate.*` tags; setting `champion` here by hand is honoured too (no gate, no tags).")


def _fmt(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if number != number else f"{number:.4f}"


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A markdown table of :data:`CARD_METRICS`: this version next to the baselines
    (popularity, tuned EASE and ALS; ``-`` where one was not evaluated)."""
    rows = ["| metric | this version | " + " | ".join(f"{label} baseline" if name ==
                                                       "popularity" else label
                                                       for name, label in BASELINES) + " |",
            "|---|---:|" + "---:|" * len(BASELINES)]
    for label, key, baseline in CARD_METRICS:
        if key in metrics:
            others = [_fmt(metrics.get(f"{name}/{baseline}")) if baseline else "-"
                      for name, _ in BASELINES]
            rows.append(f"| {label} | {_fmt(metrics[key])} | " + " | ".join(others) + " |")
    return "\n".join(rows)


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value == value else "-"


def ratios_line(metrics: Mapping[str, float], k: int = 50) -> str:
    """``served recall@50 = 1.42x popularity, 0.97x EASE, 1.05x ALS`` (what was evaluated)."""
    parts = [f"{_ratio(metrics[f'final/recall@{k}_vs_{name}'])} {label}"
             for name, label in BASELINES if f"final/recall@{k}_vs_{name}" in metrics]
    return f"Served recall@{k} = " + ", ".join(parts) + "." if parts else ""


def version_card(bundle: Any, metrics: Mapping[str, float], run_id: str) -> str:
    """A version's card at registration: contents, snapshot, metrics vs the baseline.

    Args:
        bundle: The registered :class:`~recsys_models.bundle.Bundle`.
        metrics: The evaluation on the snapshot's time holdout (may be empty).
        run_id: The MLflow run that logged the bundle.
    """
    catalog = getattr(bundle, "catalog", None)
    items = f"{len(catalog):,} items" if catalog is not None else "the catalog"
    holdout = metrics.get("holdout/users")
    lines = [
        f"**Bundle {bundle.version}**, trained on snapshot `{bundle.snapshot_id}` "
        f"(feature service `{bundle.feature_service}`), run `{run_id}`.",
        "",
        f"Holds: two-tower retrieval + HNSW index over {items}, the multi-task ranker "
        "(p_click, watch time), feature encoders and catalog.",
        "",
    ]
    if metrics:
        lines += [f"Evaluated on the snapshot's time holdout"
                  f"{f' ({int(holdout):,} users)' if holdout else ''}, with the baselines "
                  "tuned on a validation split of the training side:", "",
                  metrics_table(metrics)]
        if ratios_line(metrics):
            lines += ["", ratios_line(metrics)]
    else:
        lines.append("Not evaluated at registration.")
    return "\n".join(lines)


def gate_section(decision: str, who: str, why: str, when: str,
                 comparison: Mapping[str, Mapping[str, float | None]],
                 previous_champion: str | None, reasons: list[str],
                 baselines: Mapping[str, float] | None = None) -> str:
    """The card's gate paragraph: decision, by whom, why, the numbers it compared, and the
    tuned baselines on the same holdout (shown, not gated)."""
    before = f"version {previous_champion}" if previous_champion else "none"
    lines = [GATE_HEADING, "",
             f"**{decision}** by {who} at {when}: {why}.",
             f"Previous champion: {before}.",
             "", "| gated metric | challenger | champion |", "|---|---:|---:|"]
    for metric, pair in comparison.items():
        lines.append(f"| {metric} | {_fmt(pair.get('challenger'))} | "
                     f"{_fmt(pair.get('champion'))} |")
    if baselines:
        lines += ["", "Baselines on the same holdout (not gated): "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in baselines.items()) + "."]
    if reasons:
        lines += ["", "Refused because: " + "; ".join(reasons) + "."]
    return "\n".join(lines)


def with_gate(card: str, section: str) -> str:
    """``card`` with its gate paragraph replaced by ``section`` (the latest decision wins)."""
    head = card.split(GATE_HEADING, 1)[0].rstrip()
    return f"{head}\n\n{section}" if head else section


def describe_version(client: MlflowClient, name: str, version: str, bundle: Any,
                     metrics: Mapping[str, float], run_id: str) -> None:
    """Writes the registered model's description and version ``version``'s card."""
    client.update_registered_model(name, description=model_description(name))
    client.update_model_version(name, version, description=version_card(bundle, metrics, run_id))


def describe_gate(client: MlflowClient, name: str, version: str, tags: Mapping[str, str],
                  comparison: Mapping[str, Mapping[str, float | None]],
                  previous_champion: str | None, reasons: list[str],
                  baselines: Mapping[str, float] | None = None) -> None:
    """Adds (or replaces) the gate paragraph of version ``version``'s card."""
    card = client.get_model_version(name, version).description or ""
    section = gate_section(tags["gate.decision"], tags["gate.who"], tags["gate.why"],
                           tags["gate.when"], comparison, previous_champion, reasons,
                           baselines)
    client.update_model_version(name, version, description=with_gate(card, section))
