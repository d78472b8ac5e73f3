"""Feast's online-store layout, written with Feast's own helpers so it cannot drift.

The only module that knows it: the stream sink and the fast materializer (writers), the
serving reader and ``forget`` (deleter) all call these functions.

One Redis hash per entity: key ``serialize_entity_key(entity) + project``; a field
``mmh3("<view>:<feature>")`` per feature holding a serialized ``ValueProto``, and
``_ts:<view>`` holding the event timestamp (here the window end) as a protobuf ``Timestamp``.
This is what :class:`feast.infra.online_stores.redis.RedisOnlineStore` reads. Feast's SQLite
online store keys its rows by the same serialized entity key (without the project).

:func:`encode_column` serializes a whole column the way Feast's type map does
(``python_values_to_proto_values``), ~10-30x faster: the protobuf wire bytes are built
directly, each distinct value once, and a sample of every column is checked against Feast's
own serialization so a change in Feast fails loudly instead of writing different bytes.

Feast is imported inside the functions that call it (importing it costs ~7 s of CPU): a Ray
task that writes with a prepared :class:`EntityKeyEncoder`, field names and
``encode_column(check=False)`` never imports it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.timestamp_pb2 import Timestamp

FeatureValue = int | float | list[str]
# Feast's entity_key_serialization_version: the feature_store.yaml we write says so, and every
# key written, read or deleted here uses it.
SERIALIZATION_VERSION = 3


def _entity_proto(join_key: str, entity_id: str) -> Any:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    return EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=entity_id)])


def serialized_entity_key(join_key: str, entity_id: str,
                          serialization_version: int = SERIALIZATION_VERSION) -> bytes:
    """Feast's serialized entity key without the project (the SQLite online store's key)."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    key: bytes = serialize_entity_key(_entity_proto(join_key, entity_id),
                                      entity_key_serialization_version=serialization_version)
    return key


def entity_key(join_key: str, entity_id: str, project: str, serialization_version: int) -> bytes:
    """The Redis key of one entity's hash (string join keys, as ``user_id``/``item_id``)."""
    from feast.infra.online_stores.helpers import _redis_key

    key: bytes = _redis_key(project, _entity_proto(join_key, entity_id),
                            entity_key_serialization_version=serialization_version)
    return key


_PACK_LENGTH = struct.Struct("<I").pack


@dataclass(frozen=True)
class EntityKeyEncoder:
    """:func:`entity_key` for many ids of one join key, ~10x faster and without Feast: the
    bytes before the id's length field and after the id, from Feast's own serialization
    (:func:`entity_key_encoder`). Plain bytes, so it can be sent to a Ray task."""

    head: bytes
    project: bytes

    def __call__(self, entity_id: str) -> bytes:
        raw = entity_id.encode("utf-8")
        return b"".join((self.head, _PACK_LENGTH(len(raw)), raw, self.project))


def entity_key_encoder(join_key: str, project: str, serialization_version: int
                       ) -> EntityKeyEncoder:
    """The :class:`EntityKeyEncoder` of one join key, checked against Feast on two more ids."""
    project_bytes = project.encode("utf-8")
    sample = entity_key(join_key, "x", project, serialization_version)
    encode = EntityKeyEncoder(sample[: len(sample) - 4 - 1 - len(project_bytes)], project_bytes)
    for probe in ("item-0042", "usér_ü"):
        if encode(probe) != entity_key(join_key, probe, project, serialization_version):
            raise RuntimeError("Feast's entity key layout changed; update online_layout.py")
    return encode


@lru_cache(maxsize=1_024)
def feature_field(view: str, feature: str) -> bytes:
    """The hash field of one feature of a view."""
    from feast.infra.online_stores.helpers import _mmh3

    field: bytes = _mmh3(f"{view}:{feature}")
    return field


def ref_field(ref: str) -> bytes:
    """The hash field of a ``view:feature`` reference."""
    view, feature = ref.split(":", 1)
    return feature_field(view, feature)


def timestamp_field(view: str) -> str:
    return f"_ts:{view}"


@lru_cache(maxsize=65_536)
def _encode_scalar(is_int: bool, value: int | float) -> bytes:
    # ``is_int`` is part of the cache key: 1 == 1.0 must not share an encoding.
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    proto = ValueProto(int64_val=int(value)) if is_int else ValueProto(double_val=float(value))
    encoded: bytes = proto.SerializeToString()
    return encoded


def encode_value(value: FeatureValue) -> bytes:
    """Serializes a value with the Feast type convention: int -> Int64, float -> Float64,
    list of str -> Array(String)."""
    if isinstance(value, bool):
        raise TypeError("booleans are not a stream feature type")
    if isinstance(value, int | float):
        # Counts repeat a lot: serialize each value once.
        return _encode_scalar(isinstance(value, int), value)
    from feast.protos.feast.types.Value_pb2 import StringList
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    proto = ValueProto(string_list_val=StringList(val=list(value)))
    encoded: bytes = proto.SerializeToString()
    return encoded


def decode_value(blob: bytes | None) -> Any:
    """The Python value of one stored field (Feast's own type map), ``None`` where absent."""
    if not blob:
        return None
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.type_map import feast_value_type_to_python_type

    proto = ValueProto()
    proto.ParseFromString(blob)
    return feast_value_type_to_python_type(proto)


@lru_cache(maxsize=4_096)
def encode_timestamp(epoch_ms: int) -> bytes:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(epoch_ms / 1000, tz=UTC))
    encoded: bytes = ts.SerializeToString()
    return encoded


def decode_timestamp_ms(raw: bytes | None) -> int:
    """The stored window end in epoch ms, 0 when the view was never written."""
    if not raw:
        return 0
    ts = Timestamp()
    ts.ParseFromString(raw)
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def row_mapping(
    view: str, names: Sequence[str], values: Sequence[FeatureValue], window_end_ms: int
) -> dict[str | bytes, bytes]:
    """The hash fields written for one row of a view."""
    mapping: dict[str | bytes, bytes] = {timestamp_field(view): encode_timestamp(window_end_ms)}
    for name, value in zip(names, values, strict=True):
        mapping[feature_field(view, name)] = encode_value(value)
    return mapping


# --- whole columns: the wire bytes of Feast's ValueProto, built without protobuf objects --------

# Field tags of the ValueProto oneof (field number << 3 | wire type), as Feast's Value.proto.
_TAGS = {"STRING": b"\x12", "INT64": b"\x20", "DOUBLE": b"\x29", "UNIX_TIMESTAMP": b"\x40",
         "STRING_LIST": b"\x62"}
_CHECKED_ROWS = 16  # rows per column compared with Feast's own serialization
Wrap = Callable[[bytes], bytes]


def _identity(blob: bytes) -> bytes:
    return blob


def _varints(values: np.ndarray) -> list[bytes]:
    """Protobuf's base-128 varint of each int64 (a negative one as its 64-bit two's
    complement, ten bytes), computed for the whole array at once."""
    rest = np.asarray(values, dtype=np.int64).view(np.uint64).copy()
    groups = np.empty((len(rest), 10), dtype=np.uint8)  # 7 bits each, least significant first
    for k in range(10):
        groups[:, k] = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest >>= np.uint64(7)
    nonzero = groups != 0
    lengths = np.where(nonzero.any(axis=1), 10 - np.argmax(nonzero[:, ::-1], axis=1), 1)
    groups |= ((np.arange(10)[None, :] < (lengths - 1)[:, None]) * 0x80).astype(np.uint8)
    flat = groups.tobytes()
    return [flat[10 * i: 10 * i + n] for i, n in enumerate(lengths.tolist())]


_SMALL = _varints(np.arange(1 << 14))  # lengths of strings and lists


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    size = _SMALL[n] if n < len(_SMALL) else _varints(np.array([n]))[0]
    return b"".join((tag, size, payload))


def _expand(encoded: list[bytes], inverse: np.ndarray, present: np.ndarray, wrap: Wrap
            ) -> list[bytes]:
    """Row values from the encodings of the distinct values; a missing value is ``b""``."""
    table = [*encoded, wrap(b"")]
    index = np.where(present, inverse, len(encoded))
    return list(map(table.__getitem__, index.tolist()))


def _encode_fixed(keys: np.ndarray, blobs: Callable[[np.ndarray], list[bytes]],
                  present: np.ndarray, wrap: Wrap) -> list[bytes]:
    uniques, inverse = np.unique(keys, return_inverse=True)  # values repeat: encode each once
    return _expand([wrap(b) for b in blobs(uniques)], inverse.reshape(-1), present, wrap)


def _doubles(bits: np.ndarray) -> list[bytes]:
    raw = bits.astype("<u8").tobytes()  # the float64 bits, little-endian: fixed64
    return [_TAGS["DOUBLE"] + raw[8 * i: 8 * i + 8] for i in range(len(bits))]


def _encode_strings(values: list[Any], wrap: Wrap) -> list[bytes]:
    cache: dict[str, bytes] = {}
    tag = _TAGS["STRING"]
    missing = wrap(b"")
    out = []
    for value in values:
        if value is None:
            out.append(missing)
            continue
        text = str(value)
        blob = cache.get(text)
        if blob is None:
            blob = cache[text] = wrap(_length_delimited(tag, text.encode("utf-8")))
        out.append(blob)
    return out


def _encode_string_lists(values: list[Any], wrap: Wrap) -> list[bytes]:
    cache: dict[str, bytes] = {}  # one element of StringList.val (field 1)
    tag = _TAGS["STRING_LIST"]
    missing = wrap(b"")
    out = []
    for value in values:
        if value is None:
            out.append(missing)
            continue
        parts = []
        for item in value:
            text = "" if item is None else item  # Feast's _sanitize_list_value
            blob = cache.get(text)
            if blob is None:
                blob = cache[text] = _length_delimited(b"\n", text.encode("utf-8"))
            parts.append(blob)
        out.append(wrap(_length_delimited(tag, b"".join(parts))))
    return out


def _python_values(column: pa.ChunkedArray | pa.Array, value_type: str) -> list[Any]:
    """The values as the materializer hands them to Feast's type map."""
    if value_type == "UNIX_TIMESTAMP":
        return list(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def _feast_encoding(values: list[Any], value_type: str) -> list[bytes]:
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    protos = python_values_to_proto_values(values, ValueType[value_type])
    return [proto.SerializeToString() for proto in protos]


def _encode(column: pa.ChunkedArray | pa.Array, value_type: str, wrap: Wrap) -> list[bytes]:
    if value_type == "INT64":  # in Arrow: through pandas a null would make them floats
        present = pc.is_valid(column).to_numpy(zero_copy_only=False)
        ints = pc.fill_null(column, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
        return _encode_fixed(ints, lambda u: [_TAGS["INT64"] + v for v in _varints(u)],
                             present, wrap)
    if value_type == "DOUBLE":
        series = column.to_pandas()
        present = series.notna().to_numpy()  # NaN is written as missing, as before
        bits = series.fillna(0.0).astype("float64").to_numpy().view(np.uint64)
        return _encode_fixed(bits, _doubles, present, wrap)
    if value_type == "STRING":
        return _encode_strings(column.to_pylist(), wrap)
    if value_type == "STRING_LIST":
        return _encode_string_lists(column.to_pylist(), wrap)
    if value_type == "UNIX_TIMESTAMP":
        stamps = np.asarray(column.to_numpy(zero_copy_only=False))
        present = ~np.isnat(stamps)
        seconds = np.where(present, stamps, np.datetime64(0, "s")).astype(
            "datetime64[s]").astype(np.int64)
        out = _encode_fixed(seconds, lambda u: [_TAGS["UNIX_TIMESTAMP"] + v
                                                for v in _varints(u)], present, wrap)
        missing = np.flatnonzero(~present)
        if len(missing):  # Feast's own handling of NaT, whatever it is
            feast = _feast_encoding([stamps[i] for i in missing.tolist()], value_type)
            for i, blob in zip(missing.tolist(), feast, strict=True):
                out[i] = wrap(blob)
        return out
    return [wrap(b) for b in _feast_encoding(_python_values(column, value_type), value_type)]


def encode_column(column: pa.ChunkedArray | pa.Array, value_type: str,
                  wrap: Wrap | None = None, check: bool = True) -> list[bytes]:
    """Every value of ``column`` serialized as Feast's type map serializes it (a null: ``b""``,
    Feast's empty ``ValueProto``).

    Args:
        column: one feature's values.
        value_type: the Feast ``ValueType`` name of the feature: ``INT64``, ``DOUBLE``,
            ``STRING``, ``STRING_LIST`` and ``UNIX_TIMESTAMP`` are built here, any other
            goes through Feast's type map.
        wrap: applied to each distinct serialized value (e.g. a wire protocol's framing), so
            repeated values are wrapped once.
        check: compare a sample of rows with Feast's own serialization (imports Feast). A
            caller that turns it off checks a sample of the same column itself.

    Returns:
        One serialized (and wrapped) ``ValueProto`` per row.

    Raises:
        RuntimeError: the bytes differ from Feast's own on the checked sample (Feast's
            serialization changed: update this module).
    """
    wrapper = wrap or _identity
    out = _encode(column, value_type, wrapper)
    n = len(column)
    rows = sorted(set(np.linspace(0, n - 1, min(n, _CHECKED_ROWS)).astype(int).tolist()))
    if check and rows:
        sample = _python_values(column.take(pa.array(rows)), value_type)
        expected = [wrapper(b) for b in _feast_encoding(sample, value_type)]
        if expected != [out[i] for i in rows]:
            raise RuntimeError(f"Feast's {value_type} value serialization changed; "
                               "update recsys_core/online_layout.py")
    return out
