"""Pure candidate logic: merge sources, filter seen/excluded, cap per creator and category."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple


class Candidate(NamedTuple):
    """One candidate item; a tuple, since hundreds are built per request."""

    item_id: str
    source: str
    retrieval_score: float


def merge_sources(
    sources: Sequence[tuple[str, Sequence[str], Sequence[float] | None]], limit: int
) -> list[Candidate]:
    """Merges candidate lists in priority order; the first source to name an item keeps it.

    Args:
        sources: ``(source name, item ids, scores or None)`` in priority order.
        limit: At most this many candidates in total.
    """
    seen: set[str] = set()
    merged: list[Candidate] = []
    for name, ids, scores in sources:
        for pos, item_id in enumerate(ids):
            if item_id in seen:
                continue
            seen.add(item_id)
            score = float(scores[pos]) if scores is not None else -float(pos)
            merged.append(Candidate(item_id, name, score))
            if len(merged) >= limit:
                return merged
    return merged


def drop_items(candidates: Iterable[Candidate], blocked: set[str]) -> list[Candidate]:
    """Removes already seen and excluded items."""
    return [c for c in candidates if c.item_id not in blocked]


def diversify(
    ranked: Iterable[tuple[Candidate, float]],
    metadata: Mapping[str, tuple[str, str]],
    k: int,
    max_per_creator: int,
    max_per_category: int,
) -> list[tuple[Candidate, float]]:
    """Takes the best ``k`` items with at most N per creator and per category.

    ``ranked`` is consumed lazily, best first: only as far as the ``k`` picks need.

    When the caps leave fewer than ``k`` items, the skipped ones fill the rest in score order
    so a small catalog still returns ``k`` items.
    """
    chosen: list[tuple[Candidate, float]] = []
    skipped: list[tuple[Candidate, float]] = []
    per_creator: dict[str, int] = {}
    per_category: dict[str, int] = {}
    for cand, score in ranked:
        creator, category = metadata.get(cand.item_id, ("", ""))
        if (creator and per_creator.get(creator, 0) >= max_per_creator) or (
            category and per_category.get(category, 0) >= max_per_category
        ):
            skipped.append((cand, score))
            continue
        per_creator[creator] = per_creator.get(creator, 0) + 1
        per_category[category] = per_category.get(category, 0) + 1
        chosen.append((cand, score))
        if len(chosen) == k:
            return chosen
    return chosen + skipped[: k - len(chosen)]
