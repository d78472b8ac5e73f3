"""Two-tower retrieval: the model, its training task (loss) and a retrieval wrapper.

- :class:`TwoTowerModel` holds a sequential user tower (causal self-attention over the user's
  recent engagement sequence, SASRec style; the hashed user id and numeric user features join
  after the encoder) and an item tower (hashed item id + category + creator + tags +
  duration and age; never the numeric item features, which the catalog embedded at index time
  does not have). Both output L2-normalised vectors, so a dot product is a cosine.
- :class:`RetrievalTask` is the in-batch sampled softmax with logQ (popularity) correction and a
  temperature, optionally mixed with uniformly drawn catalog negatives.
- :class:`Retriever` wraps a trained user tower and an item index for top-N search.

Items are trained with id dropout (the id embedding is zeroed for a fraction of rows), so the
item tower also learns to embed an item from metadata alone: a brand-new item gets id bucket 0
and still lands near items like it (cold start).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_models.data import STATIC_ITEM_DENSE, EncoderSpec


@dataclass(frozen=True)
class TwoTowerConfig:
    """Architecture and loss settings."""

    dim: int = 32  # output embedding size
    id_dim: int = 32  # hashed id embedding size
    meta_dim: int = 16  # category / creator / tag embedding size
    hidden: int = 64  # MLP width in each tower
    temperature: float = 0.1  # softmax temperature on cosine scores
    # "full": cross entropy over the whole training catalog for every positive (exact; cheap
    # for catalogs of a few ten thousand items); "sampled": in-batch negatives (+ uniform
    # ``random_negatives``) with logQ correction; "auto": full up to ``full_softmax_max_items``.
    # Default sampled: on the demo snapshot full was not better (two-tower Recall@50 0.126 vs
    # 0.138) and fit ~5x slower; on MovieLens full is better (bench_movielens uses it).
    softmax: str = "sampled"
    full_softmax_max_items: int = 50_000
    logq_correction: bool = True  # sampled softmax only (a full softmax needs none)
    random_negatives: int = 0  # extra uniform catalog negatives per batch (sampled softmax)
    id_dropout: float = 0.3  # fraction of training rows whose item id embedding is zeroed
    sparse: bool = True  # sparse embedding gradients (SparseAdam): ~3.5x faster on CPU
    share_item_embeddings: bool = True  # history tokens read the item tower's id table
    seq_layers: int = 1  # self-attention blocks over the history (1-2)
    seq_heads: int = 2  # attention heads (id_dim must divide by it)
    seq_dropout: float = 0.1  # dropout in the sequence encoder (training only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, out))


class AttentionBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block over a history, oldest..newest.

    With ``last_only`` only the newest position is computed (it attends to every position, so
    under a causal mask this is exactly the last row of a full causal block, at 1/L the cost).
    """

    def __init__(self, d: int, heads: int, dropout: float, last_only: bool) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"id_dim {d} is not divisible by seq_heads {heads}")
        self.heads, self.last_only, self.dropout = heads, last_only, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        b, length, d = x.shape  # x (B, L, d); pad (B, L), True = padding
        dh = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)  # (B, L, d) each
        k = k.view(b, length, self.heads, dh).transpose(1, 2)  # (B, h, L, dh)
        v = v.view(b, length, self.heads, dh).transpose(1, 2)
        if self.last_only:
            q = q[:, -1:].reshape(b, 1, self.heads, dh).transpose(1, 2)  # (B, h, 1, dh)
            mask = ~pad[:, None, None, :]  # (B, 1, 1, L)
            x = x[:, -1:]
        else:
            q = q.reshape(b, length, self.heads, dh).transpose(1, 2)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            eye = torch.eye(length, dtype=torch.bool, device=x.device)
            mask = (causal[None, None] & ~pad[:, None, None, :]) | eye[None, None]
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, -1, d)))
        return x + self.drop(self.ff(self.ln2(x)))  # (B, L or 1, d)


class UserTower(nn.Module):
    """Causal self-attention over the engagement sequence, then user id + numeric features.

    ``history`` is newest first (bucket 0 = padding), as the online store keeps it; the
    encoder reads it oldest..newest with learned positions and the newest position's output is
    the sequence vector. The hashed user id and the numeric user features join after the
    encoder, next to the mean of the history's embeddings (an order-free residual path, which
    keeps metadata-only items reachable: without it a brand-new item was in no cluster user's
    top-50 on the synthetic data), in an MLP that gives the (B, dim) user vector.
    """

    def __init__(self, spec: EncoderSpec, cfg: TwoTowerConfig) -> None:
        super().__init__()
        d = cfg.id_dim
        self.user_emb = nn.Embedding(spec.user_buckets, d, padding_idx=0, sparse=cfg.sparse)
        self.history_emb = nn.Embedding(spec.item_buckets, d, padding_idx=0, sparse=cfg.sparse)
        self.positions = nn.Embedding(spec.history_length, d)  # 0 = newest
        self.blocks = nn.ModuleList([
            AttentionBlock(d, cfg.seq_heads, cfg.seq_dropout, last_only=i == cfg.seq_layers - 1)
            for i in range(cfg.seq_layers)])
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.seq_dropout)
        n_num = len(spec.user_features)
        self.mlp = _mlp(3 * d + n_num, cfg.hidden, cfg.dim)

    def encode_sequence(self, history: Tensor) -> Tensor:
        """(B, H) item buckets, newest first -> (B, id_dim) sequence vector."""
        seq = history.flip(1)  # (B, H) oldest..newest
        pad = seq == 0
        pad[:, -1] = False  # the newest slot is always attendable (an empty history: zeros)
        pos = self.positions.weight[: seq.shape[1]].flip(0)  # (H, d), newest last
        x = self.drop(self.history_emb(seq) + pos[None])  # (B, H, d)
        for block in self.blocks:
            x = block(x, pad)
        return self.norm(x[:, -1])  # (B, d)

    def pooled(self, history: Tensor) -> Tensor:
        """Mean of the history's id embeddings (B, id_dim); zeros for an empty history."""
        emb = self.history_emb(history)  # (B, H, d); padding rows are zeros
        count = (history != 0).sum(1, keepdim=True).clamp(min=1)
        return emb.sum(1) / count

    def forward(self, user_hash: Tensor, history: Tensor, user_num: Tensor) -> Tensor:
        s = self.encode_sequence(history)  # (B, id_dim): order-aware
        m = self.pooled(history)  # (B, id_dim): the order-free summary, a residual path
        x = torch.cat([s, m, self.user_emb(user_hash), user_num], dim=1)  # (B, 3*id_dim + U)
        return F.normalize(self.mlp(x), dim=1)  # (B, dim)


class ItemTower(nn.Module):
    """Hashed item id + category + creator + tags + dense metadata -> (B, dim).

    Only the first ``STATIC_ITEM_DENSE`` columns of ``item_dense`` (duration, age) are read.
    The numeric item features behind them (windowed impression/click counts) exist on training
    rows but not on the catalog rows that :func:`~recsys_models.bundle.build_bundle` embeds into
    the index, where they are all zeros; an item tower trained on them retrieves from a
    catalog it has never seen (on the real snapshot: Recall@50 far below popularity).
    """

    def __init__(self, spec: EncoderSpec, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(spec.item_buckets, cfg.id_dim, padding_idx=0,
                                     sparse=cfg.sparse)
        self.category_emb = nn.Embedding(len(spec.categories) + 1, cfg.meta_dim)
        self.creator_emb = nn.Embedding(spec.creator_buckets, cfg.meta_dim, padding_idx=0,
                                        sparse=cfg.sparse)
        self.tag_emb = nn.EmbeddingBag(spec.tag_buckets, cfg.meta_dim, mode="mean",
                                       padding_idx=0, sparse=cfg.sparse)
        width = cfg.id_dim + 3 * cfg.meta_dim + STATIC_ITEM_DENSE
        self.dim = cfg.dim
        self.mlp = _mlp(width, cfg.hidden, cfg.dim)

    def forward(
        self, item_hash: Tensor, category: Tensor, creator: Tensor, tags: Tensor, dense: Tensor
    ) -> Tensor:
        x = torch.cat(
            [
                self.item_emb(item_hash),  # (B, id_dim)
                self.category_emb(category),  # (B, meta_dim)
                self.creator_emb(creator),  # (B, meta_dim)
                self.tag_emb(tags),  # (B, meta_dim)
                dense[:, :STATIC_ITEM_DENSE],  # (B, STATIC_ITEM_DENSE)
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), dim=1)  # (B, dim)


class TwoTowerModel(nn.Module):
    """Both towers; ``forward`` embeds the users and items of a batch.

    Example:
        >>> model = TwoTowerModel(spec, TwoTowerConfig())
        >>> u, v = model(batch)  # (B, dim), (B, dim)
    """

    def __init__(self, spec: EncoderSpec, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.user_tower = UserTower(spec, cfg)
        self.item_tower = ItemTower(spec, cfg)
        if cfg.share_item_embeddings:  # one id table: history items and candidates agree
            self.user_tower.history_emb.weight = self.item_tower.item_emb.weight

    def embed_users(self, b: dict[str, Tensor]) -> Tensor:
        return self.user_tower(b["user_hash"], b["history"], b["user_num"])

    def embed_items(self, b: dict[str, Tensor]) -> Tensor:
        return self.item_tower(b["item_hash"], b["category"], b["creator"], b["tags"],
                               b["item_dense"])

    def forward(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        item_hash = b["item_hash"]
        if self.training and self.cfg.id_dropout > 0:
            keep = torch.rand(item_hash.shape, device=item_hash.device) >= self.cfg.id_dropout
            b = {**b, "item_hash": item_hash * keep}
        return self.embed_users(b), self.embed_items(b)


ITEM_KEYS: tuple[str, ...] = ("item_hash", "category", "creator", "tags", "item_dense")


def use_full_softmax(cfg: TwoTowerConfig, catalog_items: int) -> bool:
    """Whether training scores every positive against the whole catalog (see ``softmax``)."""
    if cfg.softmax not in ("auto", "full", "sampled"):
        raise ValueError(f"softmax must be auto, full or sampled, not {cfg.softmax!r}")
    if cfg.softmax == "auto":
        return 0 < catalog_items <= cfg.full_softmax_max_items
    return cfg.softmax == "full"


class RetrievalTask(nn.Module):
    """Next-item softmax: full over the catalog, or sampled (in-batch + uniform) with logQ.

    Full (``full=True``, needs ``catalog``): for B (user, positive) pairs the logits are
    ``u_i . c_j / T`` over the N catalog items c (embedded by the item tower in the same step,
    with id dropout, so gradients reach every item and metadata alone learns to embed); the
    target is the positive's catalog row, and other catalog items that share its id bucket are
    masked. A positive missing from the catalog is scored from its own row instead.

    Sampled: the logits are ``u_i . v_j / T - log q_j`` (j over the batch's items, plus R
    uniform catalog items with ``log q = log(R / N)``); rows where item j is the same item as
    the positive i (j != i) are masked out. The loss is the cross entropy of the diagonal.
    """

    def __init__(self, model: nn.Module, cfg: TwoTowerConfig,
                 catalog: dict[str, Tensor] | None = None, full: bool = False) -> None:
        super().__init__()
        if full and catalog is None:
            raise ValueError("a full softmax needs the encoded catalog")
        self.model, self.cfg, self.full = model, cfg, full
        self.catalog = catalog  # encoded catalog items: the full softmax or random negatives

    def _embed_items(self, items: dict[str, Tensor]) -> Tensor:
        inner = self.model.module if isinstance(
            self.model, nn.parallel.DistributedDataParallel) else self.model
        return inner.embed_items(items)  # type: ignore[operator,no-any-return]

    def forward(self, b: dict[str, Tensor]) -> Tensor:
        u, v = self.model(b)  # (B, dim), (B, dim)
        if self.full:
            return self._full(b, u, v)
        logits = u @ v.T / self.cfg.temperature  # (B, B)
        if self.cfg.logq_correction:
            logits = logits - b["log_q"][None, :]
        same = b["item_hash"][:, None] == b["item_hash"][None, :]
        eye = torch.eye(len(u), dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        n_rand = self.cfg.random_negatives
        if n_rand > 0 and self.catalog is not None:
            n_cat = self.catalog["item_hash"].shape[0]
            pick = torch.randint(0, n_cat, (n_rand,), device=u.device)
            neg = {k: self.catalog[k][pick] for k in ITEM_KEYS}
            v_neg = self._embed_items(neg)
            extra = u @ v_neg.T / self.cfg.temperature  # (B, R)
            if self.cfg.logq_correction:
                extra = extra - float(np.log(n_rand / n_cat))
            extra = extra.masked_fill(b["item_hash"][:, None] == neg["item_hash"][None, :],
                                      float("-inf"))
            logits = torch.cat([logits, extra], dim=1)  # (B, B + R)
        target = torch.arange(len(u), device=u.device)
        return F.cross_entropy(logits, target)

    def _full(self, b: dict[str, Tensor], u: Tensor, v: Tensor) -> Tensor:
        assert self.catalog is not None
        cat = self.catalog
        items = {k: cat[k] for k in ITEM_KEYS}
        if self.training and self.cfg.id_dropout > 0:  # metadata-only items learn to embed too
            keep = torch.rand(items["item_hash"].shape, device=u.device) >= self.cfg.id_dropout
            items["item_hash"] = items["item_hash"] * keep
        c = self._embed_items(items)  # (N, dim)
        n = c.shape[0]
        target = self._positions(b["item_hash"])  # (B,) catalog row of the positive, or -1
        columns = torch.arange(n, device=u.device)
        same = b["item_hash"][:, None] == cat["item_hash"][None, :]  # (B, N)
        scores = (u @ c.T).masked_fill(same & (columns[None, :] != target[:, None]),
                                       float("-inf"))  # other items of the same id bucket
        own = (u * v).sum(1, keepdim=True).masked_fill(target[:, None] >= 0, float("-inf"))
        logits = torch.cat([own, scores], dim=1) / self.cfg.temperature  # (B, 1 + N)
        return F.cross_entropy(logits, torch.where(target >= 0, target + 1, 0))

    def _positions(self, item_hash: Tensor) -> Tensor:
        """Catalog row of each item bucket (-1 when absent): the positive is scored exactly as
        every catalog item is (the row's own features differ, e.g. the item's age then)."""
        assert self.catalog is not None
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            hashes = self.catalog["item_hash"]
            size = int(max(int(hashes.max()), int(item_hash.max()))) + 1
            lookup = torch.full((size,), -1, dtype=torch.long, device=hashes.device)
            lookup[hashes] = torch.arange(len(hashes), device=hashes.device)
            self.__dict__["_lookup"] = lookup
        inside = item_hash < len(lookup)
        return torch.where(inside, lookup[item_hash.clamp(max=len(lookup) - 1)], -1)


class ItemIndex(Protocol):
    """What :class:`Retriever` needs from an index (see :mod:`recsys_models.ann`)."""

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...


class Retriever:
    """A trained user tower plus an item index: user inputs in, top-N item ids out.

    Example:
        >>> retriever = Retriever(model.user_tower, index)
        >>> ids, scores = retriever.retrieve(encode_users(users, spec), n=100)
    """

    def __init__(self, user_tower: UserTower, index: ItemIndex) -> None:
        self.user_tower = user_tower.eval()
        self.index = index

    @torch.no_grad()
    def embed(self, users: dict[str, np.ndarray]) -> np.ndarray:
        t = {k: torch.as_tensor(users[k]) for k in ("user_hash", "history", "user_num")}
        out = self.user_tower(t["user_hash"], t["history"], t["user_num"].float())
        return out.numpy().astype(np.float32)  # (n, dim)

    def retrieve(self, users: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(self.embed(users), n)


@torch.no_grad()
def embed_item_batch(item_tower: ItemTower, items: dict[str, np.ndarray],
                     batch_size: int = 8192) -> np.ndarray:
    """Item-tower embeddings of encoded items, in chunks: (n, dim) float32."""
    item_tower.eval()
    n = len(items["item_hash"])
    out = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        t = {k: torch.as_tensor(items[k][sl]) for k in ITEM_KEYS}
        out.append(item_tower(t["item_hash"], t["category"], t["creator"], t["tags"],
                              t["item_dense"].float()).numpy())
    if not out:
        return np.zeros((0, item_tower.dim), np.float32)
    return np.concatenate(out).astype(np.float32)

