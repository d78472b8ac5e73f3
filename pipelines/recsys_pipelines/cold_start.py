"""Cold-start lists (trending, fresh, popular) as small Redis sorted sets.

Serving never scans the catalog to find them: the pipelines keep each list small and sorted,
and a replica reads ``LIST_SIZE`` members of each (``O(list)``, not ``O(catalog)``).

- ``popular`` (score: 7-day clicks, else 7-day impressions) and ``fresh`` (score: publication
  time, epoch seconds) are replaced whole by the batch materialization
  (:func:`write_batch_lists`, written under a temporary key and renamed into place);
- ``trending`` (score: ``clicks_1h * 1e6 + impressions_1h``) is updated by the stream job's
  item writer (:func:`trending_updates`), with a companion set of each member's window end
  (``trending:at``) so members older than the view's TTL are pruned (:func:`prune_trending`)
  and skipped when read.

Where the online store is not Redis (Feast's SQLite store), the batch lists go to a small JSON
file instead (:func:`cold_start_file`; no trending list there, the stream job writes Redis).

Keys end with the Feast project, like Feast's own keys: ``<prefix>:cold_start:<list>:<project>``.
This module is the only one that knows the layout; the writers and the reader call it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis

from recsys_core.atomic import atomic_write_text

if TYPE_CHECKING:
    from recsys_core.settings import Settings

LIST_NAMES: tuple[str, ...] = ("trending", "fresh", "popular")
LIST_SIZE = 200  # members a replica reads of each list
TRENDING_KEEP = 2_000  # members the stream writer keeps in the trending set
TRENDING_TTL = timedelta(hours=2)  # the item_trending view's TTL: older windows are stale
_CLICK_WEIGHT = 1e6  # trending order: clicks first, impressions break ties


def list_key(prefix: str, project: str, name: str) -> str:
    """The sorted set of one list."""
    return f"{prefix}:cold_start:{name}:{project}"


def _at_key(prefix: str, project: str) -> str:
    return f"{prefix}:cold_start:trending:at:{project}"


def trending_score(clicks_1h: float, impressions_1h: float) -> float:
    """Clicks first, impressions break ties (and order the list when nothing was clicked)."""
    return float(clicks_1h) * _CLICK_WEIGHT + min(float(impressions_1h), _CLICK_WEIGHT - 1)


def write_batch_lists(client: redis.Redis, prefix: str, project: str,
                      lists: Mapping[str, Mapping[str, float]]) -> None:
    """Replaces the batch lists (``popular``, ``fresh``) whole: ``{list: {item: score}}``."""
    with client.pipeline(transaction=True) as pipe:
        for name, scores in lists.items():
            key = list_key(prefix, project, name)
            if not scores:
                pipe.delete(key)
                continue
            tmp = f"{key}:tmp"
            pipe.delete(tmp)
            pipe.zadd(tmp, dict(scores))
            pipe.rename(tmp, key)
        pipe.execute()


def trending_updates(pipe: Any, prefix: str, project: str,
                     rows: Sequence[tuple[str, float, int]]) -> None:
    """Queues the trending members of a batch of stream rows on ``pipe``.

    Args:
        pipe: A Redis pipeline (executed by the caller with its other writes).
        rows: ``(item_id, score, window_end_ms)``; a score of 0 removes the item.
    """
    key, at = list_key(prefix, project, "trending"), _at_key(prefix, project)
    scores = {item: score for item, score, _ in rows if score > 0}
    gone = [item for item, score, _ in rows if score <= 0]
    if scores:
        pipe.zadd(key, scores)
        pipe.zadd(at, {item: end for item, score, end in rows if score > 0})
    if gone:
        pipe.zrem(key, *gone)
        pipe.zrem(at, *gone)
    pipe.zremrangebyrank(key, 0, -TRENDING_KEEP - 1)


def prune_trending(client: redis.Redis, prefix: str, project: str, newest_end_ms: int) -> int:
    """Removes members whose window ended more than the TTL before ``newest_end_ms``."""
    at = _at_key(prefix, project)
    cutoff = newest_end_ms - int(TRENDING_TTL.total_seconds() * 1000)
    stale = cast(list[bytes], client.zrangebyscore(at, "-inf", f"({cutoff}"))
    if stale:
        with client.pipeline(transaction=False) as pipe:
            pipe.zrem(list_key(prefix, project, "trending"), *stale)
            pipe.zrem(at, *stale)
            pipe.execute()
    # Members no longer in the trending set (trimmed) need no window end either.
    return len(stale)


def read_lists(client: redis.Redis, prefix: str, project: str, size: int = LIST_SIZE
               ) -> dict[str, list[str]]:
    """The top ``size`` members of each list, best first (one round trip).

    Trending members whose window is older than the TTL (relative to the newest member's)
    are skipped even before the writer prunes them.
    """
    with client.pipeline(transaction=False) as pipe:
        for name in LIST_NAMES:
            pipe.zrevrange(list_key(prefix, project, name), 0, 2 * size - 1)
        replies = cast(list[list[bytes]], pipe.execute())
    lists = {name: [m.decode() for m in members]
             for name, members in zip(LIST_NAMES, replies, strict=True)}
    trending = lists["trending"]
    if trending:
        ends = cast(list[float | None], client.zmscore(_at_key(prefix, project), trending))
        known = [e for e in ends if e is not None]
        cutoff = (max(known) if known else 0) - TRENDING_TTL.total_seconds() * 1000
        lists["trending"] = [i for i, e in zip(trending, ends, strict=True)
                             if e is not None and e >= cutoff]
    return {name: members[:size] for name, members in lists.items()}


def cold_start_file(settings: Settings) -> Path:
    """The batch lists' file when the online store is not Redis."""
    return settings.data_dir / "feast" / f"cold_start_lists-{settings.feast.project}.json"


def write_lists_file(path: Path, lists: Mapping[str, Mapping[str, float]]) -> None:
    ordered = {name: [i for i, _ in sorted(scores.items(), key=lambda kv: -kv[1])][:LIST_SIZE]
               for name, scores in lists.items()}
    atomic_write_text(path, json.dumps(ordered))


def read_lists_file(path: Path, size: int = LIST_SIZE) -> dict[str, list[str]]:
    """The lists of :func:`write_lists_file` (empty lists when there is no file yet)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    return {name: [str(i) for i in data.get(name, [])][:size] for name in LIST_NAMES}
