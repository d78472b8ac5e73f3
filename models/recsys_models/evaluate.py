"""Offline evaluation on a time-based holdout, with the same code for every model.

Protocol (docs/evaluation.md): rows before a time cutoff train, rows after it are the
holdout. A holdout user's relevant items are those they clicked in the holdout; the query is the
user's state at their first holdout impression (history of clicks before it, numeric features
as of then). Items the user clicked in training are excluded from every model's list. Retrieval
lists (two-tower, popularity, anything else) go through :func:`retrieval_metrics`; ranker
predictions on every holdout impression go through :func:`ranking_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

logger = logging.getLogger(__name__)

KS: tuple[int, ...] = (10, 50, 100)
CHUNK_USERS = 256  # users per evaluation chunk (settings.evaluation.chunk_users)
CHUNK_ROWS = 50_000  # holdout rows ranked at once
Recommender = Callable[[pd.DataFrame, int, dict[str, set[str]]], np.ndarray]


@dataclass
class HoldoutQueries:
    """What every retrieval model is asked, and what counts as a hit."""

    users: pd.DataFrame  # one row per holdout user: user_id, user_history, features
    relevant: list[set[str]]  # clicked holdout items, aligned with users
    exclude: dict[str, set[str]]  # training clicks per user


def holdout_queries(train: pd.DataFrame, holdout: pd.DataFrame) -> HoldoutQueries:
    """Holdout users with at least one click, queried at their first holdout impression."""
    clicked = holdout[holdout["clicked"] == 1]
    relevant = clicked.groupby("user_id")["item_id"].agg(set)
    first = holdout.sort_values("event_time", kind="stable").drop_duplicates("user_id")
    users = first[first["user_id"].isin(relevant.index)].reset_index(drop=True)
    seen = train[train["clicked"] == 1].groupby("user_id")["item_id"].agg(set)
    exclude = {u: seen.get(u, set()) for u in users["user_id"]}
    return HoldoutQueries(users, [relevant[u] for u in users["user_id"]], exclude)


def popularity_recommender(train: pd.DataFrame) -> Recommender:
    """Most-clicked training items, minus the user's excluded items."""
    counts = train.loc[train["clicked"] == 1, "item_id"].value_counts()
    # ties by item id: the same list whatever order the rows arrive in
    ranked = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    ranked = ranked.index.to_numpy()

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        out = np.empty((len(users), k), dtype=object)
        for i, uid in enumerate(users["user_id"]):
            seen = exclude.get(uid, set())
            top = [x for x in ranked[: k + len(seen)] if x not in seen][:k]
            out[i] = top + [None] * (k - len(top))
        return out

    return recommend


def holdout_cutoffs(frame: pd.DataFrame, fraction: float, protocol: str = "global"
                    ) -> pd.Timestamp | pd.Series:
    """Where the holdout starts: one time (``global``: the ``1 - fraction`` quantile of event
    time) or, for ``per-user``, a time per user (the time of their row at position
    ``ceil(size * (1 - fraction))`` in time order; users with too few rows have none: NaT).
    Rows at or after their cutoff are the holdout."""
    times = pd.to_datetime(frame["event_time"], utc=True)
    if protocol == "global":
        return times.quantile(1.0 - fraction)
    if protocol != "per-user":
        raise ValueError(f"unknown holdout protocol {protocol!r} (global or per-user)")
    ordered = pd.DataFrame({"u": frame["user_id"].to_numpy(), "t": times.to_numpy()})
    ordered = ordered.sort_values(["u", "t"], kind="stable")
    pos = ordered.groupby("u", sort=False).cumcount().to_numpy()
    size = ordered.groupby("u", sort=False)["t"].transform("size").to_numpy()
    first = ordered[pos == np.ceil(size * (1.0 - fraction)).astype(np.int64)]
    return first.set_index("u")["t"]


def in_holdout(frame: pd.DataFrame, cutoff: pd.Timestamp | pd.Series) -> np.ndarray:
    """Boolean mask of ``frame``'s rows at or after their cutoff (see :func:`holdout_cutoffs`)."""
    times = pd.to_datetime(frame["event_time"], utc=True)
    if isinstance(cutoff, pd.Series):
        per_row = pd.to_datetime(frame["user_id"].map(cutoff), utc=True)
        return (times >= per_row).fillna(False).to_numpy(dtype=bool)
    return (times >= cutoff).to_numpy(dtype=bool)


def holdout_split(frame: pd.DataFrame, fraction: float, protocol: str = "global"
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(before, after)``: the last ``fraction`` by time, globally or per user."""
    mask = in_holdout(frame, holdout_cutoffs(frame, fraction, protocol))
    return frame[~mask], frame[mask]


class _RetrievalSums:
    """Running sums of per-user Recall@K, NDCG@K and the recall curve over chunks of users."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks, self.max_k = tuple(ks), max(ks)
        self.discounts = 1.0 / np.log2(np.arange(2, self.max_k + 2))
        self.recall = dict.fromkeys(self.ks, 0.0)
        self.ndcg = dict.fromkeys(self.ks, 0.0)
        self.curve = np.zeros(self.max_k)
        self.users = 0

    def add(self, recs: np.ndarray, relevant: Sequence[set[str]]) -> None:
        if len(relevant) == 0:
            return
        width = min(self.max_k, recs.shape[1] if recs.ndim == 2 else 0)
        hits = np.zeros((len(relevant), self.max_k))  # (users, max K)
        for i, (row, rel) in enumerate(zip(recs, relevant, strict=True)):
            hits[i, :width] = [x in rel for x in row[:width]]
        sizes = np.array([len(r) for r in relevant], dtype=float)
        cum = np.cumsum(hits, axis=1)
        gains = np.cumsum(hits * self.discounts, axis=1)
        ideal = np.cumsum(self.discounts)
        for k in self.ks:
            self.recall[k] += float((cum[:, k - 1] / sizes).sum())
            self.ndcg[k] += float((gains[:, k - 1] / ideal[np.minimum(sizes, k).astype(int) - 1])
                                  .sum())
        self.curve += (cum / sizes[:, None]).sum(axis=0)
        self.users += len(relevant)

    def metrics(self) -> dict[str, float]:
        n = max(self.users, 1)
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"recall@{k}"] = self.recall[k] / n
            out[f"ndcg@{k}"] = self.ndcg[k] / n
        return out


def retrieval_metrics(recs: np.ndarray, relevant: Sequence[set[str]],
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@K and NDCG@K (binary relevance) over users; ``recs`` is (n_users, >=max K)."""
    sums = _RetrievalSums(ks)
    sums.add(recs, relevant)
    return sums.metrics()


def recall_curve(recs: np.ndarray, relevant: Sequence[set[str]], max_k: int) -> np.ndarray:
    """Recall@k for k = 1..max_k: (max_k,)."""
    sums = _RetrievalSums((max_k,))
    sums.add(recs, relevant)
    return sums.curve / max(sums.users, 1)


def _chunk(queries: HoldoutQueries, start: int, stop: int) -> HoldoutQueries:
    users = queries.users.iloc[start:stop].reset_index(drop=True)
    return HoldoutQueries(users, queries.relevant[start:stop],
                          {u: queries.exclude.get(u, set()) for u in users["user_id"]})


def evaluate_retrieval(recommenders: dict[str, Recommender], queries: HoldoutQueries,
                       ks: Sequence[int] = KS, chunk_users: int = CHUNK_USERS
                       ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics ``<model>/<metric>@K`` for each recommender, plus their recall curves.

    Users are asked ``chunk_users`` at a time, so memory depends on the chunk, not on the
    number of holdout users.
    """
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    n = len(queries.users)
    for name, recommend in recommenders.items():
        sums = _RetrievalSums(ks)
        for start in range(0, n, chunk_users):
            part = _chunk(queries, start, start + chunk_users)
            sums.add(recommend(part.users, max(ks), part.exclude), part.relevant)
        for key, value in sums.metrics().items():
            metrics[f"{name}/{key}"] = value
        curves[name] = sums.curve / max(sums.users, 1)
    return metrics, curves


def _gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes."""
    frame = pd.DataFrame({"u": user_ids, "y": labels, "s": scores})
    total, weight = 0.0, 0
    for _, g in frame.groupby("u", sort=False):
        if 0 < g["y"].sum() < len(g):
            total += roc_auc_score(g["y"], g["s"]) * len(g)
            weight += len(g)
    return total / weight if weight else float("nan")


def calibration_curve(labels: np.ndarray, probs: np.ndarray,
                      bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: mean prediction, observed rate, count."""
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    pred = np.bincount(idx, probs, minlength=bins) / np.maximum(count, 1)
    rate = np.bincount(idx, labels, minlength=bins) / np.maximum(count, 1)
    return pred, rate, count


def ranking_metrics(user_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    watch_true_ms: np.ndarray, watch_pred_ms: np.ndarray) -> dict[str, float]:
    """AUC, GAUC, log loss, expected calibration error, and watch-time errors where known."""
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    out = {
        "auc": float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else float("nan"),
        "gauc": _gauc(user_ids, labels, p),
        "logloss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),
    }
    pred, rate, count = calibration_curve(labels, p)
    out["ece"] = float(np.sum(count * np.abs(pred - rate)) / max(count.sum(), 1))
    out["mean_p_click"], out["ctr"] = float(p.mean()), float(labels.mean())
    known = ~np.isnan(watch_true_ms)
    out["watch_rows"] = float(known.sum())
    if known.any():
        err = watch_pred_ms[known] - watch_true_ms[known]
        out["watch_mae_ms"] = float(np.abs(err).mean())
        out["watch_mae_log"] = float(np.abs(np.log1p(watch_pred_ms[known] / 1000)
                                            - np.log1p(watch_true_ms[known] / 1000)).mean())
    return out


@dataclass
class EvaluationReport:
    """All metrics of one evaluation plus the curves behind the plots."""

    metrics: dict[str, float]
    recall_curves: dict[str, np.ndarray]
    calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def figures(self) -> dict[str, Figure]:
        """Recall@K curve, calibration curve and training curves, for MLflow artifacts."""
        figs: dict[str, Figure] = {}
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, curve in self.recall_curves.items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
        ax.set(xlabel="K", ylabel="Recall@K", title="Retrieval recall on the holdout")
        ax.legend()
        figs["recall_at_k.png"] = fig
        if self.calibration is not None:
            pred, rate, count = self.calibration
            fig, ax = plt.subplots(figsize=(5, 4))
            ok = count > 0
            ax.plot([0, 1], [0, 1], "--", color="grey")
            ax.plot(pred[ok], rate[ok], "o-")
            ax.set(xlabel="predicted P(click)", ylabel="observed click rate",
                   title="Ranker calibration")
            figs["calibration.png"] = fig
        if self.history:
            fig, ax = plt.subplots(figsize=(5, 4))
            epochs = [h["epoch"] for h in self.history]
            for key in ("retrieval_loss", "ranker_loss"):
                ax.plot(epochs, [h.get(key, np.nan) for h in self.history], "o-", label=key)
            ax.set(xlabel="epoch", ylabel="loss", title="Training curves")
            ax.legend()
            figs["training_curves.png"] = fig
        return figs


def evaluate_bundle(bundle: Any, train: pd.DataFrame, holdout: pd.DataFrame,
                    ks: Sequence[int] = KS, extra: dict[str, Recommender] | None = None,
                    history: list[dict[str, float]] | None = None,
                    candidates: int = 500, chunk_users: int = CHUNK_USERS,
                    max_users: int | None = None) -> EvaluationReport:
    """Evaluates a :class:`~recsys_models.bundle.Bundle` and the baselines on the same holdout.

    Three kinds of list go through the same metric code: ``two_tower`` (retrieval order
    alone), ``final`` (retrieval of ``candidates`` items, then the ranker: what
    ``Bundle.recommend`` and so ``recsys recommend`` return) and the baselines
    (``popularity``, plus any in ``extra``, e.g. tuned EASE and ALS from
    :func:`~recsys_models.baselines.tuned_baselines`). Ratios
    ``final/recall@K_vs_<baseline>`` compare the final list with each baseline.

    Metric keys: ``<list>/recall@K`` and ``ndcg@K``, ``ranker/auc``, ``ranker/gauc``,
    ``ranker/logloss``, ``ranker/ece``, ``ranker/watch_mae_ms``; the ranker's reference points
    ``ranker/logreg_auc`` (a logistic regression on the same features) and
    ``ranker/item_mean_watch_mae_ms``; also the ``ann/recall@100`` of the index against exact
    search for the holdout users. Users are evaluated ``chunk_users`` at a time and holdout
    rows ranked :data:`CHUNK_ROWS` at a time: memory does not grow with the holdout's users.
    ``max_users`` (``settings.evaluation.max_users``) evaluates the rows of that many holdout
    users only (:func:`sample_users`); ``holdout/all_users`` is then the whole holdout's count.
    """
    from recsys_models.ann import recall_vs_exact

    all_users = holdout["user_id"].nunique()
    holdout = sample_users(holdout, max_users)
    queries = holdout_queries(train, holdout)
    recommenders: dict[str, Recommender] = {
        "two_tower": bundle_recommender(bundle),
        "final": final_recommender(bundle, candidates),
        "popularity": popularity_recommender(train), **(extra or {}),
    }
    metrics, curves = evaluate_retrieval(recommenders, queries, ks, chunk_users)
    for name in recommenders:
        if name == "final":
            continue
        for k in ks:
            base = metrics[f"{name}/recall@{k}"]
            metrics[f"final/recall@{k}_vs_{name}"] = (metrics[f"final/recall@{k}"] / base
                                                      if base > 0 else float("nan"))
    holdout = holdout.reset_index(drop=True)
    # aligned: each impression with its own item, CHUNK_ROWS rows at a time
    ranked = pd.concat([bundle.rank(part, part) for part in
                        (holdout.iloc[i:i + CHUNK_ROWS] for i in range(0, len(holdout),
                                                                       CHUNK_ROWS))]
                       or [bundle.rank(holdout, holdout)], ignore_index=True)
    labels = holdout["clicked"].to_numpy(dtype=float)
    watch = pd.to_numeric(holdout["watch_time_ms"], errors="coerce").to_numpy(dtype=float)
    p = ranked["p_click"].to_numpy()
    for key, value in ranking_metrics(holdout["user_id"].to_numpy(), labels, p, watch,
                                      ranked["watch_time_ms_pred"].to_numpy()).items():
        metrics[f"ranker/{key}"] = value
    metrics |= ranker_references(bundle, holdout)
    if len(queries.users):
        user_emb = np.concatenate([  # (users, dim)
            bundle.encode_users(queries.users.iloc[i:i + chunk_users])
            for i in range(0, len(queries.users), chunk_users)])
        metrics["ann/recall@100"] = recall_vs_exact(bundle.index, bundle.item_embeddings,
                                                    user_emb, 100)
    metrics["holdout/users"] = float(len(queries.users))
    metrics["holdout/all_users"] = float(all_users)
    metrics["holdout/rows"] = float(len(holdout))
    return EvaluationReport(metrics, curves, calibration_curve(labels, np.clip(p, 0, 1)),
                            history or [])


def sample_users(holdout: pd.DataFrame, max_users: int | None) -> pd.DataFrame:
    """The holdout rows of at most ``max_users`` users (all rows when None or fewer users):
    the users with the smallest hashes of their id, so every model and every run evaluated on
    the same holdout sees the same users, whatever the row order."""
    if max_users is None:
        return holdout
    users = pd.unique(holdout["user_id"].astype(str))
    if len(users) <= max_users:
        return holdout
    hashes = pd.util.hash_array(users.astype(object))
    keep = users[np.argsort(hashes, kind="stable")[:max_users]]
    logger.info("evaluating %d of %d holdout users (evaluation.max_users)", max_users,
                len(users))
    return holdout[holdout["user_id"].astype(str).isin(set(keep))]


def _folds(user_ids: np.ndarray) -> np.ndarray:
    """0/1 fold of each row, by a hash of its user (rows of one user share a fold)."""
    return (pd.util.hash_array(user_ids.astype(str).astype(object)) % np.uint64(2)).astype(int)


def ranker_references(bundle: Any, holdout: pd.DataFrame) -> dict[str, float]:
    """What the ranker must beat on the same holdout impressions, fitted out of fold (two
    folds by user, so no row is scored by a model that saw it):

    - ``ranker/logreg_auc``: scikit-learn logistic regression on the ranker's dense inputs
      (numeric user and item features, the retrieval score, one-hot category);
    - ``ranker/item_mean_watch_mae_ms``: each item's mean watch time (global mean for items the
      other fold never watched), where watch time is known.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from recsys_models.bundle import retrieval_scores
    from recsys_models.data import encode_rows

    out: dict[str, float] = {}
    if len(holdout) < 4:
        return out
    frame = holdout.reset_index(drop=True)
    batch = encode_rows(frame, bundle.spec)
    known = frame["item_id"].isin(bundle.known_items).to_numpy()
    batch["item_hash"] = np.where(known, batch["item_hash"], 0)
    n_cat = len(bundle.spec.categories) + 1
    x = np.concatenate([batch["user_num"], batch["item_dense"],
                        retrieval_scores(bundle.two_tower, batch)[:, None],
                        np.eye(n_cat, dtype=np.float32)[batch["category"]]], axis=1)
    y = batch["clicked"].astype(int)
    fold = _folds(frame["user_id"].to_numpy())
    pred = np.full(len(y), np.nan)
    for f in (0, 1):
        fit, score = fold != f, fold == f
        if score.any() and len(np.unique(y[fit])) == 2:
            # Standardized inputs: raw counts and milliseconds next to one-hot columns left
            # lbfgs short of convergence (sklearn's ConvergenceWarning in the demo).
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            model.fit(x[fit], y[fit])
            pred[score] = model.predict_proba(x[score])[:, 1]
    ok = ~np.isnan(pred)
    if ok.any() and 0 < y[ok].sum() < ok.sum():
        out["ranker/logreg_auc"] = float(roc_auc_score(y[ok], pred[ok]))
    watch = pd.to_numeric(frame["watch_time_ms"], errors="coerce").to_numpy(dtype=float)
    has = ~np.isnan(watch)
    if has.sum() >= 2:
        errors = []
        for f in (0, 1):
            fit, score = has & (fold != f), has & (fold == f)
            if not fit.any() or not score.any():
                continue
            means = pd.Series(watch[fit]).groupby(frame["item_id"].to_numpy()[fit]).mean()
            guess = frame["item_id"][score].map(means).fillna(watch[fit].mean()).to_numpy()
            errors.append(np.abs(guess - watch[score]))
        if errors:
            out["ranker/item_mean_watch_mae_ms"] = float(np.concatenate(errors).mean())
    return out


def final_recommender(bundle: Any, candidates: int = 500) -> Recommender:
    """The list a user receives: ``Bundle.recommend`` (retrieval, then the ranker)."""

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        recs = bundle.recommend(users, k, candidates=max(candidates, k), exclude=exclude)
        out = np.full((len(users), k), None, dtype=object)
        grouped = recs.groupby("user_id", sort=False)["item_id"].agg(list)
        for i, uid in enumerate(users["user_id"]):
            top = list(grouped.get(uid, []))[:k]
            out[i, : len(top)] = top
        return out

    return recommend


def bundle_recommender(bundle: Any) -> Recommender:
    """The bundle's retrieval stage (user tower + HNSW) as a recommender."""

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        extra = max((len(v) for v in exclude.values()), default=0)
        ids, _ = bundle.search(bundle.encode_users(users), k + extra)
        out = np.empty((len(users), k), dtype=object)
        for i, uid in enumerate(users["user_id"]):
            seen = exclude.get(uid, set())
            top = [x for x in ids[i] if x not in seen][:k]
            out[i] = top + [None] * (k - len(top))
        return out

    return recommend
