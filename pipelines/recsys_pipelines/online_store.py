"""Which online store a profile uses: Redis when it answers, else Feast's SQLite store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import redis

from recsys_core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineStoreChoice:
    kind: Literal["redis", "sqlite"]
    reason: str


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server at ``url`` answers PING within the timeout."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def resolve_online_store(settings: Settings) -> OnlineStoreChoice:
    """Resolves ``feast.online_store: auto`` by probing Redis; explicit choices are kept."""
    wanted = settings.feast.online_store
    if wanted == "sqlite":
        return OnlineStoreChoice("sqlite", "configured")
    if wanted == "redis":
        return OnlineStoreChoice("redis", f"configured: {settings.redis.url}")
    if redis_answers(settings.redis.url):
        return OnlineStoreChoice("redis", f"{settings.redis.url} answered")
    logger.warning("Redis at %s does not answer; using Feast's SQLite online store",
                   settings.redis.url)
    return OnlineStoreChoice("sqlite", f"{settings.redis.url} did not answer")
