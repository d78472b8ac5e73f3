"""The strict ``POST /recommend`` schema: the outside probe's hostile requests are refused.

Before: every request below except the malformed JSON was accepted (and logged verbatim into
the impression log), ``"k": "5"`` and ``"k": true`` were coerced, a 20 MB body was read whole,
non-UTF-8 and deep nesting were 400 ``There was an error parsing the body``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from recsys_core.errors import InvalidRequestError
from recsys_platform.serving.schemas import (
    MAX_BODY_BYTES,
    MAX_EXCLUDE,
    MAX_REASON_CHARS,
    MAX_REASONS,
    RecommendRequest,
    parse_request,
    request_json_schema,
)


def _refused(body: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        parse_request(body)
    reasons = err.value.reasons
    assert reasons and len(reasons) <= MAX_REASONS + 1
    assert all(len(r) <= MAX_REASON_CHARS for r in reasons)
    return err.value


def _json(**fields: Any) -> bytes:
    return json.dumps({"user_id": "u1", **fields}).encode()


def test_a_valid_request_parses() -> None:
    request = parse_request(_json(k=5, context={"surface": "search", "device": "tv"},
                                  exclude=["i1", "m12"]))
    assert request == RecommendRequest(user_id="u1", k=5, exclude=["i1", "m12"],
                                       context={"surface": "search", "device": "tv"})
    assert parse_request(b'{"user_id": "p_0123abcd"}').context.surface == "feed"


@pytest.mark.parametrize("body, field", [
    (_json(k="5"), "k"),
    (_json(k=True), "k"),
    (_json(k=5.0), "k"),
    (json.dumps({"user_id": 12}).encode(), "user_id"),
    (_json(context={"surface": "evil<script>"}), "context.surface"),
    (_json(context={"surface": "x" * 1_000_000}), "body"),  # over the body limit first
    (_json(context={"surface": "x" * 10_000}), "context.surface"),
    (_json(context={"device": "toaster"}), "context.device"),
    (json.dumps({"user_id": "u1\x00"}).encode(), "user_id"),
    (json.dumps({"user_id": "u1\r\nSet-Cookie: x"}).encode(), "user_id"),
    (json.dumps({"user_id": "../../etc/passwd"}).encode(), "user_id"),
    (json.dumps({"user_id": "u" * 129}).encode(), "user_id"),
    (_json(exclude=[f"i{n}" for n in range(MAX_EXCLUDE + 1)]), "exclude"),
    (_json(exclude=["i" * 2_000]), "exclude.0"),
    (_json(exclude="i1"), "exclude"),
])
def test_hostile_and_coerced_fields_are_refused(body: bytes, field: str) -> None:
    err = _refused(body)
    assert any(r.startswith(f"{field}:") for r in err.reasons), err.reasons
    assert "etc/passwd" not in " ".join(err.reasons) and "<script>" not in " ".join(err.reasons)


def test_oversized_body_is_413() -> None:
    err = _refused(b"{" + b" " * (20 * 1024 * 1024) + b'"user_id": "u1"}')
    assert err.status == 413 and str(MAX_BODY_BYTES) in err.reasons[0]


def test_non_utf8_body_is_422_with_a_reason() -> None:
    err = _refused(b'{"user_id": "u\xff\xfe1"}')
    assert err.status == 422 and "not UTF-8" in err.reasons[0]


def test_deep_nesting_is_422_with_a_reason() -> None:
    depth = 30_000  # as deep as fits under the body limit
    err = _refused(b'{"user_id": "u1", "exclude": ' + b"[" * depth + b"]" * depth + b"}")
    assert err.status == 422 and "recursion limit" in err.reasons[0], err.reasons
    err = _refused(b"[" * 100_000)  # 100k deep and unterminated, cut at the body limit
    assert err.status == 413
    err = _refused(b"[" * 60_000)
    assert err.status == 422 and "recursion" in err.reasons[0].lower(), err.reasons


def test_many_unknown_fields_give_bounded_reasons() -> None:
    body = json.dumps({"user_id": "u1", **{f"f{n}" + "x" * 500: 1 for n in range(50)}}).encode()
    err = _refused(body)
    assert len(err.reasons) == MAX_REASONS + 1 and err.reasons[-1] == "... and 40 more"


def test_openapi_schema_is_self_contained() -> None:
    schema = request_json_schema()
    assert "$ref" not in json.dumps(schema)
    assert schema["properties"]["context"]["properties"]["device"]["enum"] == [
        "ios", "android", "web", "tv"]
