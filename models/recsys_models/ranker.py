"""Multi-task ranker: a shared bottom with a click head and a watch-time head.

- click head: logit of P(click), trained with binary cross entropy on every impression;
- watch-time head: ``log1p(watch seconds)`` regression on rows whose watch time is known
  (masked elsewhere, e.g. on MovieLens, where it never is);
- the retrieval score (the two-tower's cosine of user and item) is an input, so the ranker
  re-orders the retrieved candidates knowing how strongly retrieval ranked them;
- :class:`RankingTask` trains it on the impressions plus negatives that were never shown:
  items the frozen two-tower retrieves for the same user (hard negatives). Sources without
  real impressions (MovieLens: every row is a rated movie) then still teach "will engage among
  the candidates", not only "liked, given watched";
- :class:`Blend` turns both into one ranking score:
  ``click_weight * p_click + watch_weight * p_click * watch_pred_ms / watch_scale_ms``
  (the second term is the expected watch time, scaled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_models.data import EncoderSpec
from recsys_models.two_tower import TwoTowerModel

UserSide = dict[str, Tensor]  # Ranker.user_side's output: one row per user
ItemSide = dict[str, Tensor]  # Ranker.item_side's output: one row per item


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and loss weights."""

    emb_dim: int = 16
    hidden: int = 64
    watch_loss_weight: float = 0.5  # weight of the masked watch-time MSE next to the click BCE
    sparse: bool = True
    # Never-shown negatives per training row, drawn from the user's retrieval top-N: for
    # sources without real impressions (MovieLens: every row is a rated movie) set e.g. 4;
    # with real impressions (the generator, production logs) the shown-not-clicked rows are
    # the negatives and extra ones dilute them (demo snapshot: AUC 0.49 with 4).
    negatives: int = 0
    negatives_from_top: int = 500  # N: how deep they are drawn (serving's candidate count)
    retrieval_weight: float = 1.0  # initial weight of the retrieval score in the click logit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Blend:
    """How the two heads and the retrieval score make one ranking score.

    ``retrieval_weight`` adds the two-tower's score (a cosine) to the heads' blend and
    ``neighbour_weight`` the item-item neighbour score of the candidate against the user's
    history (:mod:`recsys_models.neighbours`, when the bundle has a neighbour table); both
    are tuned on the validation split after training
    (:func:`recsys_models.validation.tune_blend`), so the final list keeps retrieval's order
    where neither the ranker nor the neighbours improve on it there.

    ``click_logit`` (tuned there too) puts the click head on its log-odds scale instead of
    its probability: the ranker's click logit is the retrieval score x its weight plus a
    learned correction, and on that scale its order among the top candidates adds to the
    other scores as it is, where the probability squeezes it (MovieLens's two validation
    folds both chose it: final list Recall@10 +11% and +2%; docs/evaluation.md).
    """

    click_weight: float = 1.0
    watch_weight: float = 0.5
    watch_scale_ms: float = 60_000.0
    retrieval_weight: float = 0.0
    neighbour_weight: float = 0.0
    click_logit: bool = False  # the click term as log-odds (False: the probability)

    def score(self, p_click: np.ndarray, watch_ms: np.ndarray,
              retrieval: np.ndarray | None = None,
              neighbour: np.ndarray | None = None) -> np.ndarray:
        expected = p_click * watch_ms / self.watch_scale_ms
        click = log_odds(p_click) if self.click_logit else p_click
        out = self.click_weight * click + self.watch_weight * expected
        if self.retrieval_weight and retrieval is not None:
            out = out + self.retrieval_weight * retrieval
        if self.neighbour_weight and neighbour is not None:
            out = out + self.neighbour_weight * neighbour
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> str:
        """The tuned part in words, e.g. ``retrieval weight 3, neighbour weight 10, click
        head as log-odds``."""
        scale = "log-odds" if self.click_logit else "probability"
        return (f"retrieval weight {self.retrieval_weight:g}, neighbour weight "
                f"{self.neighbour_weight:g}, click head as {scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ranker(nn.Module):
    """Shared-bottom MLP over user, item and history features with two heads.

    Example:
        >>> ranker = Ranker(spec, RankerConfig())
        >>> click_logit, watch_log = ranker(batch)  # (B,), (B,)
    """

    def __init__(self, spec: EncoderSpec, cfg: RankerConfig) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        d = cfg.emb_dim
        self.user_emb = nn.Embedding(spec.user_buckets, d, padding_idx=0, sparse=cfg.sparse)
        self.item_emb = nn.Embedding(spec.item_buckets, d, padding_idx=0, sparse=cfg.sparse)
        self.history_emb = nn.EmbeddingBag(spec.item_buckets, d, mode="mean", padding_idx=0,
                                           sparse=cfg.sparse)
        self.category_emb = nn.Embedding(len(spec.categories) + 1, d)
        self.creator_emb = nn.Embedding(spec.creator_buckets, d, padding_idx=0, sparse=cfg.sparse)
        self.tag_emb = nn.EmbeddingBag(spec.tag_buckets, d, mode="mean", padding_idx=0,
                                       sparse=cfg.sparse)
        # user, item, history, category, creator, tags, history*item, history*category,
        # user numeric, item dense, retrieval score
        width = 8 * d + len(spec.user_features) + spec.item_dense_dim + 1
        self.bottom = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(),
                                    nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU())
        self.click_head = nn.Linear(cfg.hidden, 1)
        self.watch_head = nn.Linear(cfg.hidden, 1)
        # The click logit is a learned correction on top of the retrieval score: zero at
        # initialization, so an untrained ranker keeps retrieval order and training only moves
        # away from it where the impressions and never-shown negatives say so.
        nn.init.zeros_(self.click_head.weight)
        self.retrieval_weight = nn.Parameter(torch.tensor(float(cfg.retrieval_weight)))

    # The model in three parts, so that inference computes a request's user side once and
    # reads item sides precomputed per catalog (recsys_models.scoring); training runs them
    # together in forward().

    def user_side(self, user_hash: Tensor, history: Tensor, user_num: Tensor) -> UserSide:
        """Per-user inputs of :meth:`head`: id and history embeddings, numeric features."""
        return {"user": self.user_emb(user_hash), "history": self.history_emb(history),
                "user_num": user_num.float()}

    def item_side(self, item_hash: Tensor, category: Tensor, creator: Tensor, tags: Tensor,
                  item_dense: Tensor) -> ItemSide:
        """Per-item inputs of :meth:`head`: id, category, creator and tag embeddings, dense
        metadata and numeric item features (the last ``len(spec.item_features)`` columns)."""
        return {"item": self.item_emb(item_hash), "category": self.category_emb(category),
                "creator_tags": torch.cat([self.creator_emb(creator), self.tag_emb(tags)], 1),
                "item_dense": item_dense.float()}

    def head(self, user: UserSide, item: ItemSide, retrieval_score: Tensor
             ) -> tuple[Tensor, Tensor]:
        """Click logit and ``log1p(watch seconds)`` (B,) each, from aligned user and item
        sides (B rows each) and the two-tower's score of each row."""
        hist = user["history"]
        x = torch.cat(
            [
                user["user"], item["item"], hist, item["category"], item["creator_tags"],
                hist * item["item"], hist * item["category"],
                user["user_num"], item["item_dense"], retrieval_score[:, None],
            ],
            dim=1,
        )  # (B, width)
        h = self.bottom(x)  # (B, hidden)
        click = self.click_head(h).squeeze(1) + self.retrieval_weight * retrieval_score
        return click, self.watch_head(h).squeeze(1)  # (B,), (B,)

    def forward(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        user = self.user_side(b["user_hash"], b["history"], b["user_num"])
        item = self.item_side(b["item_hash"], b["category"], b["creator"], b["tags"],
                              b["item_dense"])
        return self.head(user, item, b["retrieval_score"])


def log_odds(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` as float32, ``p`` clipped to [1e-7, 1 - 1e-7] (float32 rounds a
    sigmoid above ~16.6 to exactly 1)."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(q / (1.0 - q)).astype(np.float32)


def click_and_watch(click_logit: Tensor, watch_log: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(p_click, watch_time_ms_pred)`` as float32 arrays from the heads' outputs."""
    p_click = torch.sigmoid(click_logit).numpy().astype(np.float32)
    watch = (torch.expm1(watch_log.clamp(min=0, max=20)) * 1000.0).numpy().astype(np.float32)
    return p_click, watch


def ranker_loss(ranker: nn.Module, b: dict[str, Tensor], watch_weight: float) -> Tensor:
    """Click BCE on every row + watch-time MSE on rows with known watch time."""
    click_logit, watch_pred = ranker(b)
    bce = F.binary_cross_entropy_with_logits(click_logit, b["clicked"])
    mask = b["watch_mask"]
    mse = ((watch_pred - b["watch_log"]) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)
    return bce + watch_weight * mse


RETRIEVAL_USER_KEYS = ("user_hash", "history", "user_num")
RETRIEVAL_ITEM_KEYS = ("item_hash", "category", "creator", "tags", "item_dense")


class RankingTask(nn.Module):
    """Ranker loss on impressions plus never-shown negatives drawn from retrieval.

    The two-tower is frozen (trained first). Each batch row gets its retrieval score; then,
    per row, ``cfg.negatives`` catalog items drawn uniformly from the user's retrieval
    top-``negatives_from_top`` (the row's own item excluded) join as label-0 rows with no
    watch time.
    """

    def __init__(self, ranker: nn.Module, two_tower: TwoTowerModel, cfg: RankerConfig,
                 catalog: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.ranker, self.cfg = ranker, cfg
        self.two_tower = two_tower  # the raw TwoTowerModel (not DDP-wrapped), frozen
        self.catalog = catalog
        self.catalog_emb: Tensor | None = None

    @torch.no_grad()
    def prepare(self) -> None:
        """Embeds the catalog with the (final) item tower; call once before the ranker phase."""
        if self.catalog is None or self.cfg.negatives <= 0:
            return
        self.two_tower.eval()
        tower = self.two_tower.item_tower
        parts = []
        n = self.catalog["item_hash"].shape[0]
        for start in range(0, n, 8192):
            t = {k: self.catalog[k][start:start + 8192] for k in RETRIEVAL_ITEM_KEYS}
            parts.append(tower(t["item_hash"], t["category"], t["creator"], t["tags"],
                               t["item_dense"].float()))
        self.catalog_emb = torch.cat(parts)  # (N, dim)

    def forward(self, b: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            self.two_tower.eval()
            u = self.two_tower.user_tower(b["user_hash"], b["history"], b["user_num"].float())
            v = self.two_tower.item_tower(b["item_hash"], b["category"], b["creator"], b["tags"],
                                          b["item_dense"].float())
            batch = {**b, "retrieval_score": (u * v).sum(1)}  # (B,)
            if self.catalog_emb is not None and self.catalog is not None:
                batch = self._with_negatives(batch, u)
        return ranker_loss(self.ranker, batch, self.cfg.watch_loss_weight)

    def _with_negatives(self, b: dict[str, Tensor], u: Tensor) -> dict[str, Tensor]:
        assert self.catalog_emb is not None and self.catalog is not None
        scores = u @ self.catalog_emb.T  # (B, N)
        depth = min(self.cfg.negatives_from_top, scores.shape[1])
        top_scores, top = scores.topk(depth, dim=1)  # (B, depth)
        pick = torch.randint(0, depth, (len(u), self.cfg.negatives), device=u.device)
        rows = top.gather(1, pick).reshape(-1)  # (B * n,)
        neg_scores = top_scores.gather(1, pick).reshape(-1)
        owner = torch.arange(len(u), device=u.device).repeat_interleave(self.cfg.negatives)
        neg = {k: b[k][owner] for k in RETRIEVAL_USER_KEYS}
        neg |= {k: self.catalog[k][rows] for k in RETRIEVAL_ITEM_KEYS}
        keep = neg["item_hash"] != b["item_hash"][owner]  # never the row's own item
        n = int(keep.sum())
        neg["retrieval_score"] = neg_scores
        zeros = torch.zeros(len(owner), device=u.device)
        neg |= {"clicked": zeros, "watch_log": zeros, "watch_mask": zeros}
        out = {}
        for key in (*RETRIEVAL_USER_KEYS, *RETRIEVAL_ITEM_KEYS, "retrieval_score", "clicked",
                    "watch_log", "watch_mask"):
            extra = neg[key][keep]
            out[key] = torch.cat([b[key], extra.to(b[key].dtype)]) if n else b[key]
        return out
