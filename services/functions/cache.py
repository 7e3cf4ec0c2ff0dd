"""The response cache for deterministic requests: an LRU in each worker, or Redis when a URL is set.

Keys hash everything the answer depends on (model tag, dtype, inputs, parameters), so workers and servers
with other settings can share one Redis without mixing answers. Values are bytes either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import bentoml
import orjson
from cachetools import LRUCache

R = TypeVar("R")

FORMAT = "v1"  # in every key: values stored by a version that encodes them differently are never read

LOOKUPS = bentoml.metrics.Counter(
    name="fnserve_cache_lookups",
    documentation="Response-cache lookups (one per embedding input, one per chat request), by result",
    labelnames=["function", "result"],
)


class ResponseCache(Protocol):
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    async def set_many(self, items: dict[str, bytes]) -> None: ...


class LocalCache:
    def __init__(self, size: int) -> None:
        self._entries: LRUCache[str, bytes] = LRUCache(maxsize=size)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._entries.get(key) for key in keys]

    async def set_many(self, items: dict[str, bytes]) -> None:
        self._entries.update(items)


class RedisCache:
    """Shared by every worker and replica. A Redis that cannot be reached costs the cache, not the
    request: lookups then miss and stores are skipped."""

    def __init__(self, url: str, ttl_seconds: int = 7 * 24 * 3600) -> None:
        from redis.asyncio import Redis

        # Short timeouts: a lookup that would take longer than a small forward pass is not worth it.
        self._redis = Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        self._ttl = ttl_seconds

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        from redis.exceptions import RedisError

        try:
            return await self._redis.mget(keys)
        except (RedisError, OSError):
            return [None] * len(keys)

    async def set_many(self, items: dict[str, bytes]) -> None:
        from redis.exceptions import RedisError

        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=self._ttl)
                await pipe.execute()
        except (RedisError, OSError):
            return


def response_cache(redis_url: str | None, size: int) -> ResponseCache | None:
    """None when `size` is 0; otherwise Redis when a URL is configured, or an LRU of `size` entries."""
    if not size:
        return None
    return RedisCache(redis_url) if redis_url else LocalCache(size)


def cache_key(namespace: str, *parts: Any) -> str:
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"fnserve:{namespace}:{FORMAT}:{digest}"


def count_lookups(function: str, hits: int, lookups: int) -> None:
    LOOKUPS.labels(function=function, result="hit").inc(hits)
    LOOKUPS.labels(function=function, result="miss").inc(lookups - hits)


async def through_cache(
    cache: ResponseCache | None,
    function: str,
    keys: Callable[[], list[str]],
    compute: Callable[[list[int]], Awaitable[list[R]]],
    pack: Callable[[R], bytes],
    unpack: Callable[[bytes], R],
    count: int,
) -> tuple[list[R], int | None]:
    """Results for `count` inputs of one request, in order, and how many came from the cache (None with
    the cache off: nothing was looked up, so nothing is counted or reported as a miss): the others go to
    `compute` (given their indices) and are stored. `keys` is called only when there is a cache to look
    in: hashing inputs is not free."""
    if cache is None:
        return await compute(list(range(count))), None
    names = keys()
    stored = await cache.get_many(names)
    cached = {i: unpack(value) for i, value in enumerate(stored) if value is not None}
    count_lookups(function, len(cached), count)
    missing = [i for i in range(count) if i not in cached]
    computed = await compute(missing) if missing else []
    if missing:
        await cache.set_many({names[i]: pack(result) for i, result in zip(missing, computed, strict=True)})
    fresh = iter(computed)
    return [cached[i] if i in cached else next(fresh) for i in range(count)], len(cached)
