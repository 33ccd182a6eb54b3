"""The rate limit's leased blocks (app/access/ratelimit.py), against a real Redis: a
busy principal's requests mostly skip the round trip, and no process, nor all of them
together, ever admits more than the limit in a second."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from app.access.ratelimit import RateLimiter
from events.redis_log import Keys

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_client(redis_url: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def scripts(client: Any) -> int:
    stats: Any = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


async def admitted(limiter: RateLimiter, principal: str, n: int, per_second: int) -> int:
    return sum([await limiter.admit(principal, per_second) for _ in range(n)])


async def test_a_rare_principal_counts_each_request(redis_client: Any) -> None:
    clock, keys = Clock(), Keys("rl1")
    limiter = RateLimiter(redis_client, keys, clock)
    await limiter.admit("warm", 3)  # (the script's first call loads it: two calls)
    before = await scripts(redis_client)
    assert [await limiter.admit("p", 3) for _ in range(5)] == [True] * 3 + [False] * 2
    assert await scripts(redis_client) - before == 5  # no history here: one at a time
    clock.now += 1
    assert await limiter.admit("p", 3)  # a new second, a new count


async def test_a_busy_principal_leases_blocks_and_never_passes_the_limit(
    redis_client: Any,
) -> None:
    clock, keys = Clock(), Keys("rl2")
    first, second = RateLimiter(redis_client, keys, clock), RateLimiter(redis_client, keys, clock)
    # A busy second on both processes: 300 requests each, within a limit of 1,000.
    assert await admitted(first, "p", 300, 1000) == 300
    assert await admitted(second, "p", 300, 1000) == 300
    clock.now += 1
    before = await scripts(redis_client)
    # The next second: blocks of min(1000 // 16, 300 // 8) = 37 requests.
    assert await admitted(first, "p", 300, 1000) == 300
    assert await scripts(redis_client) - before <= 300 // 37 + 1
    # Both together, asking far past the limit: exactly the limit is admitted.
    got = 300
    for _ in range(40):
        got += await admitted(second, "p", 25, 1000) + await admitted(first, "p", 25, 1000)
    assert got == 1000
    assert not await first.admit("p", 1000) and not await second.admit("p", 1000)


async def test_principals_are_counted_apart(redis_client: Any) -> None:
    clock, keys = Clock(), Keys("rl3")
    limiter = RateLimiter(redis_client, keys, clock)
    assert await admitted(limiter, "a", 10, 4) == 4
    assert await admitted(limiter, "b", 10, 4) == 4
