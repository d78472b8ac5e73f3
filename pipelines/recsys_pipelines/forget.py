"""``recsys privacy forget``: remove one user's events, features and online keys everywhere.

A user is named by the raw id or the pseudonym; a row matches when its ``user_id`` maps to the
same pseudonym (:func:`recsys_core.privacy.pseudonymize` is idempotent), so both the raw
ids of the landing area and the pseudonyms of the lake are found, whichever was given.

Where the user is removed (each file rewritten atomically: temp file, then rename):

- ``landing``: raw event partitions and the users snapshot (Parquet), newline-JSON files;
- ``impression log``: what serving wrote (``landing/served/``, ``served-*`` event files);
- ``lake`` and ``quarantine``: clean partitions, the users catalog, rejected rows;
- ``offline features``: the Parquet tables Feast reads (``<repo>/data``) and the fast
  materializer's per-entity digests (``<data_dir>/feast/materialized/``);
- ``stream side outputs``: the stream job's dead-letter and late files (finished parts);
- ``online store``: Feast's Redis hash of the user (batch and stream views) and the stream
  job's own keys of the user (``<key_prefix>:stream:<kind>:<user>``: recent items, late
  events);
- ``forget list``: training snapshots are immutable, so the user's tombstone is recorded and
  every later snapshot leaves the user out
  (:func:`recsys_pipelines.training_set.exclude_forgotten`).

An audit record (who, when, counts, the tombstone; never the raw id) is appended to
``<data_dir>/privacy/audit.jsonl``. Running it twice is harmless: the second run removes 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_core import features as F
from recsys_core.atomic import atomic_write_lines
from recsys_core.privacy import (
    AUDIT_LOG,
    FORGET_LIST,
    add_to_forget_list,
    pseudonymize,
    tombstone,
)
from recsys_core.settings import Settings
from recsys_pipelines.etl import atomic_write_table
from recsys_pipelines.feature_store import offline_dir
from recsys_pipelines.materialize import state_root
from recsys_pipelines.online_store import resolve_online_store

logger = logging.getLogger(__name__)

PLACES: tuple[str, ...] = ("landing", "impression log", "lake", "quarantine",
                           "offline features", "stream side outputs", "online store")
STREAM_SIDE_OUTPUTS: tuple[str, ...] = ("deadletter", "late")  # beside the checkpoints


@dataclass
class ForgetReport:
    """What one forget run removed: rows (files) or keys (online store) per place."""

    tombstone: str
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PLACES, 0))
    files_rewritten: int = 0
    at: str = ""
    who: str = ""


class _Matcher:
    """Decides which ``user_id`` values belong to the user; remembers the ones it saw."""

    def __init__(self, user_id: str, key: str) -> None:
        self.key = key
        self.pseudonym = pseudonymize(user_id, key)
        self.seen: set[str] = {user_id, self.pseudonym}
        self._cache: dict[str, bool] = {}

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        hit = self._cache.get(value)
        if hit is None:
            hit = self._cache[value] = pseudonymize(value, self.key) == self.pseudonym
            if hit:
                self.seen.add(value)
        return hit


def _files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in suffixes and not path.name.startswith("."):
            yield path


def forget_in_parquet(path: Path, match: _Matcher, column: str = "user_id") -> int:
    """Rewrites one Parquet file without the user's rows (``column`` holds the user id);
    returns the rows removed. The file's schema metadata is kept."""
    schema = pq.read_schema(path)
    if column not in schema.names:
        return 0
    table = pq.read_table(path)
    ids = pc.unique(table.column(column)).to_pylist()
    hits = [v for v in ids if match(v)]
    if not hits:
        return 0
    keep = pc.invert(pc.fill_null(pc.is_in(table.column(column),
                                           value_set=pa.array(hits, pa.string())), False))
    atomic_write_table(table.filter(keep), path)
    return table.num_rows - int(pc.sum(keep.cast(pa.int64())).as_py() or 0)


def _rewrite_lines(path: Path, hit: Callable[[str], bool]) -> int:
    """Rewrites a text file atomically without the lines ``hit`` selects; returns how many."""
    with path.open() as fh:
        lines = fh.readlines()
    kept = [line for line in lines if not hit(line)]
    removed = len(lines) - len(kept)
    if removed:
        atomic_write_lines(path, kept)
    return removed


def forget_in_jsonl(path: Path, match: _Matcher) -> int:
    """Rewrites one newline-JSON file without the user's lines; returns the lines removed."""

    def hit(line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and bool(match(record.get("user_id")))

    return _rewrite_lines(path, hit)


def forget_in_side_output(path: Path, match: _Matcher) -> int:
    """Rewrites one stream dead-letter/late part file (JSON lines ``{"line": <raw event>,
    ...}``) without the user's lines; returns the lines removed.

    A raw line that is not a JSON object is dropped when it names the user's pseudonym or the
    given id as a JSON string (``"<id>"``).
    """

    def hit(text: str) -> bool:
        try:
            raw = json.loads(text).get("line") or ""
        except (json.JSONDecodeError, AttributeError):
            return False
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            return any(f'"{name}"' in raw for name in match.seen)
        return isinstance(event, dict) and bool(match(event.get("user_id")))

    return _rewrite_lines(path, hit)


def side_output_files(settings: Settings) -> Iterator[Path]:
    """The stream job's finished dead-letter and late part files (in-progress ones are
    hidden: their names start with a dot)."""
    base = Path(settings.path(settings.flink.checkpoint_dir)).resolve().parent
    for name in STREAM_SIDE_OUTPUTS:
        folder = base / name
        if folder.is_dir():
            yield from (p for p in sorted(folder.rglob("*"))
                        if p.is_file() and not p.name.startswith("."))


def _place(path: Path, settings: Settings) -> str:
    landing, lake = settings.landing_dir.resolve(), settings.lake_dir.resolve()
    path = path.resolve()
    if path.is_relative_to(lake / "quarantine"):
        return "quarantine"
    if path.is_relative_to(lake):
        return "lake"
    if path.is_relative_to(landing / "served") or path.name.startswith("served-"):
        return "impression log"
    if path.is_relative_to(offline_dir(settings)):
        return "offline features"
    return "landing"


def file_roots(settings: Settings) -> list[Path]:
    """Folders searched for the user's rows: landing (with the stream's files), lake,
    offline feature tables."""
    roots = [settings.landing_dir, Path(settings.path(settings.flink.stream_dir)),
             settings.lake_dir, offline_dir(settings)]
    unique: list[Path] = []
    for root in roots:
        resolved = root.resolve()
        if not any(resolved.is_relative_to(u) for u in unique):
            unique = [u for u in unique if not u.is_relative_to(resolved)] + [resolved]
    return unique


def forget_online(settings: Settings, user_ids: set[str]) -> int:
    """Deletes the user's online rows; returns Redis keys (or SQLite rows) deleted.

    Redis: Feast's hash of each id (it holds the batch and the stream views) and the stream
    job's own keys that end in the id (``<key_prefix>:stream:<kind>:<id>``). Feast's SQLite
    fallback store: the rows of each id in every table of the project.

    Raises:
        redis.RedisError: Redis is configured but does not answer (the run fails rather than
            report an online store it could not clean).
    """
    if resolve_online_store(settings).kind == "sqlite":
        return _forget_sqlite(settings, user_ids)
    import redis

    from recsys_core.online_layout import SERIALIZATION_VERSION, entity_key

    client = redis.Redis.from_url(settings.redis.url)
    try:
        keys: list[bytes] = []
        own = f"{settings.redis.key_prefix}:stream:"
        for uid in sorted(user_ids):
            keys.append(entity_key(F.USER_KEY, uid, settings.feast.project,
                                   SERIALIZATION_VERSION))
            # The stream job's own per-user keys (recent items, late events, ...) end in the id.
            pattern = f"{_glob_escape(own)}*:{_glob_escape(uid)}"
            keys += list(client.scan_iter(match=pattern, count=1_000))
        deleted: int = client.delete(*keys) if keys else 0  # type: ignore[assignment]
        return deleted
    finally:
        client.close()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _forget_sqlite(settings: Settings, user_ids: set[str]) -> int:
    import sqlite3

    from recsys_core.online_layout import serialized_entity_key

    path = settings.data_dir.resolve() / "feast" / "online.db"
    if not path.is_file():
        return 0
    keys = [serialized_entity_key(F.USER_KEY, uid) for uid in sorted(user_ids)]
    deleted = 0
    with sqlite3.connect(path) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")
                  if row[0].startswith(f"{settings.feast.project}_")]
        for table in tables:
            columns = {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
            if "entity_key" not in columns:
                continue
            for blob in keys:
                cursor = conn.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (blob,))
                deleted += cursor.rowcount
    return deleted


def forget_user(settings: Settings, user_id: str, who: str) -> ForgetReport:
    """Removes a user's data from every place the platform keeps it (see the module docs).

    Args:
        settings: The platform settings (data dir, Feast project, Redis, privacy key).
        user_id: The raw id or the pseudonym.
        who: The operator, for the audit record.

    Returns:
        Counts per place, as also written to the audit log.

    Raises:
        ValueError: ``user_id`` is empty.
    """
    if not user_id.strip():
        raise ValueError("user_id must not be empty")
    key = settings.privacy.key
    match = _Matcher(user_id, key)
    report = ForgetReport(tombstone(user_id, key), who=who,
                          at=datetime.now(UTC).isoformat(timespec="seconds"))
    # The tombstone goes first: a training set built while files are rewritten already
    # leaves the user out.
    add_to_forget_list(settings.data_dir / FORGET_LIST, report.tombstone)
    for root in file_roots(settings):
        for path in _files(root, (".parquet", ".jsonl")):
            removed = (forget_in_parquet(path, match) if path.suffix == ".parquet"
                       else forget_in_jsonl(path, match))
            if removed:
                report.removed[_place(path, settings)] += removed
                report.files_rewritten += 1
    for path in side_output_files(settings):
        removed = forget_in_side_output(path, match)
        if removed:
            report.removed["stream side outputs"] += removed
            report.files_rewritten += 1
    report.removed["online store"] = forget_online(settings, match.seen)
    # The fast materializer's digests of what it wrote online (one row per entity, kept
    # beside Feast's offline data).
    for path in _files(state_root(settings), (".parquet",)):
        removed = forget_in_parquet(path, match, column="entity")
        if removed:
            report.removed["offline features"] += removed
            report.files_rewritten += 1
    audit = settings.data_dir / AUDIT_LOG
    audit.parent.mkdir(parents=True, exist_ok=True)
    with audit.open("a") as fh:
        fh.write(json.dumps({"action": "forget", **asdict(report)}) + "\n")
    logger.info("forgot user %s: %s (%d files rewritten)", report.tombstone, report.removed,
                report.files_rewritten)
    return report
