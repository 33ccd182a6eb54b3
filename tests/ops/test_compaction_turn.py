"""Background compaction with several processes on one Redis (``serve --workers N``,
pods): one of them compacts each round, the one that takes the round's lease."""

from __future__ import annotations

import msgspec
import pytest

from app.services import Services
from app.settings import Settings

pytestmark = pytest.mark.anyio


async def test_one_process_per_round_compacts(settings: Settings) -> None:
    async with Services.open(settings) as first, Services.open(settings) as second:
        assert await first.compaction_turn(60.0)
        assert not await second.compaction_turn(60.0)
        assert not await first.compaction_turn(60.0)  # once per round, even for the holder
        lease = f"{settings.redis_prefix}:{{compact}}:lease"
        ttl_ms = await first.redis.pttl(lease)
        assert 0 < ttl_ms <= 54_000  # lapses before the next round (60 s later)
        await first.redis.delete(lease)  # the round is over
        assert await second.compaction_turn(60.0)


async def test_the_lease_is_per_deployment(settings: Settings) -> None:
    """Two deployments sharing one Redis under different prefixes compact independently."""
    other = msgspec.structs.replace(settings, redis_prefix=settings.redis_prefix + "x")
    async with Services.open(settings) as first, Services.open(other) as second:
        assert await first.compaction_turn(60.0)
        assert await second.compaction_turn(60.0)
