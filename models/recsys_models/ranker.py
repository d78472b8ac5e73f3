"""Multi-task ranker: a shared bottom with a click head and a watch-time head.

- click head: logit of P(click), trained with binary cross entropy on every impression;
- watch-time head: ``log1p(watch seconds)`` regression on rows whose watch time is known
  (masked elsewhere, e.g. on MovieLens, where it never is);
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


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and loss weights."""

    emb_dim: int = 16
    hidden: int = 64
    watch_loss_weight: float = 0.5  # weight of the masked watch-time MSE next to the click BCE
    sparse: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Blend:
    """How the two heads make one score; configurable per deployment."""

    click_weight: float = 1.0
    watch_weight: float = 0.5
    watch_scale_ms: float = 60_000.0

    def score(self, p_click: np.ndarray, watch_ms: np.ndarray) -> np.ndarray:
        expected = p_click * watch_ms / self.watch_scale_ms
        return (self.click_weight * p_click + self.watch_weight * expected).astype(np.float32)

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
        # user, item, history, category, creator, tags, history*item, history*category
        width = 8 * d + len(spec.user_features) + spec.item_dense_dim
        self.bottom = nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(),
                                    nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU())
        self.click_head = nn.Linear(cfg.hidden, 1)
        self.watch_head = nn.Linear(cfg.hidden, 1)

    def forward(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        hist = self.history_emb(b["history"])  # (B, d)
        item = self.item_emb(b["item_hash"])  # (B, d)
        cat = self.category_emb(b["category"])  # (B, d)
        x = torch.cat(
            [
                self.user_emb(b["user_hash"]), item, hist, cat,
                self.creator_emb(b["creator"]), self.tag_emb(b["tags"]),
                hist * item, hist * cat,
                b["user_num"], b["item_dense"],
            ],
            dim=1,
        )  # (B, width)
        h = self.bottom(x)  # (B, hidden)
        return self.click_head(h).squeeze(1), self.watch_head(h).squeeze(1)  # (B,), (B,)


def ranker_loss(ranker: nn.Module, b: dict[str, Tensor], watch_weight: float) -> Tensor:
    """Click BCE on every row + watch-time MSE on rows with known watch time."""
    click_logit, watch_pred = ranker(b)
    bce = F.binary_cross_entropy_with_logits(click_logit, b["clicked"])
    mask = b["watch_mask"]
    mse = ((watch_pred - b["watch_log"]) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)
    return bce + watch_weight * mse


@torch.no_grad()
def predict(ranker: Ranker, batch: dict[str, np.ndarray],
            batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``(p_click, watch_time_ms_pred)`` for encoded rows, each (n,)."""
    ranker.eval()
    n = len(batch["item_hash"])
    probs, watch = [], []
    for start in range(0, n, batch_size):
        t = {k: torch.as_tensor(v[start:start + batch_size]) for k, v in batch.items()
             if k in _RANKER_KEYS}
        t["user_num"] = t["user_num"].float()
        t["item_dense"] = t["item_dense"].float()
        logit, wlog = ranker(t)
        probs.append(torch.sigmoid(logit).numpy())
        watch.append((torch.expm1(wlog.clamp(min=0, max=20)) * 1000.0).numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(watch).astype(np.float32)


_RANKER_KEYS = ("user_hash", "history", "user_num", "item_hash", "category", "creator", "tags",
                "item_dense")
