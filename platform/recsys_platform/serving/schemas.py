"""Request and response models of ``POST /recommend`` (unknown fields are 422 errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recsys_platform.contracts import DEVICES, SURFACES

Source = Literal["retrieval", "trending", "fresh", "popular"]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    surface: str = Field(default="feed", description=f"one of {', '.join(SURFACES)}")
    device: str = Field(default="web", description=f"one of {', '.join(DEVICES)}")


class RecommendRequest(BaseModel):
    """What a client asks for."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=128)
    k: int = Field(default=20, ge=1, le=200)
    context: Context = Context()
    exclude: list[str] = Field(default_factory=list, max_length=1000)


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
