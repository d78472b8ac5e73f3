"""Request and response models of ``POST /recommend``, and the request's parser.

The request is strict: unknown fields, wrong JSON types (``"k": "5"``, ``"k": true``), ids
outside the contract's charset and length (:data:`~recsys_core.contracts.ID_PATTERN`),
surfaces and devices outside the contract's vocabularies, too many excluded items, bodies over
:data:`MAX_BODY_BYTES`, non-UTF-8 bodies and deep nesting are all refused before anything is
logged. :func:`parse_request` turns raw body bytes into a request or an
:class:`~recsys_core.errors.InvalidRequestError` with bounded reasons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from recsys_core.contracts import DEVICES, ID_CHARS, ID_PATTERN, MAX_ID_LENGTH, SURFACES
from recsys_core.errors import InvalidRequestError

Source = Literal["retrieval", "trending", "fresh", "popular"]

MAX_BODY_BYTES = 64 * 1024  # a request with 500 excluded ids of 128 characters fits
MAX_EXCLUDE = 500
MAX_REASONS = 10  # reasons returned (and logged) per rejected request
MAX_REASON_CHARS = 200  # each reason is cut to this length: a field name may be huge

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH),
               Field(description=f"1-{MAX_ID_LENGTH} characters of {ID_CHARS}")]


def _one_of(allowed: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return AfterValidator(check)


Surface = Annotated[str, Field(max_length=32, json_schema_extra={"enum": list(SURFACES)}),
                    _one_of(SURFACES)]
Device = Annotated[str, Field(max_length=32, json_schema_extra={"enum": list(DEVICES)}),
                   _one_of(DEVICES)]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    surface: Surface = "feed"
    device: Device = "web"


class RecommendRequest(BaseModel):
    """What a client asks for (strict JSON types: ``"k": "5"`` is an error, not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Id
    k: int = Field(default=20, ge=1, le=200)
    context: Context = Context()
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE)


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    source: Source
    position: int


class RecommendResponse(BaseModel):
    """What the service answers: ranked items, the bundle that ranked them, what degraded."""

    request_id: str
    user_id: str
    bundle_version: str | None
    items: list[RecommendedItem]
    degraded: list[str] = Field(default_factory=list, description="stages that fell back")
    source: Literal["model", "retrieval_order", "popular"]


def request_json_schema() -> dict[str, Any]:
    """The request's JSON schema with its definitions inlined (for the OpenAPI document,
    where ``#/$defs/...`` references would not resolve)."""
    schema = RecommendRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def validation_reasons(errors: Sequence[Mapping[str, Any]]) -> list[str]:
    """``field: message`` per pydantic error, at most :data:`MAX_REASONS`, each bounded."""
    reasons = []
    for error in errors[:MAX_REASONS]:
        where = ".".join(str(p) for p in error.get("loc") or () if p != "body") or "body"
        reasons.append(_cut(f"{where}: {error.get('msg')}"))
    if len(errors) > MAX_REASONS:
        reasons.append(f"... and {len(errors) - MAX_REASONS} more")
    return reasons


def parse_request(body: bytes) -> RecommendRequest:
    """Validates a raw ``POST /recommend`` body.

    Raises:
        InvalidRequestError: The body is too large, not UTF-8 JSON, nested too deep, or does
            not fit the schema; the reasons name the field and never echo its value.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequestError([f"body: larger than {MAX_BODY_BYTES} bytes"], status=413)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError([f"body: not UTF-8 (byte {exc.start})"]) from None
    try:
        return RecommendRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequestError(validation_reasons(exc.errors(include_input=False))) from None
