"""The per-principal rate limit, counted in Redis across every API process, with the
allowance of a busy principal leased in blocks so that most requests skip the round
trip.

The count is one Redis counter per principal and second. A process that has just seen a
principal make many requests takes several at once from that counter (``INCRBY``) and
spends them locally for the rest of the second; a principal seen rarely takes one per
request, as before. Nothing is ever admitted past the limit: a process spends only what
the counter granted it. What a block costs is the other way: tokens a process leased
and did not spend in its second are lost to the other processes, at most one block
(``per_second // LEASE_SHARE``) per process and second, so a limit spread over many
processes may refuse a little early, never late.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from events.redis_log import Keys, guarded

RATE_LUA = """
-- A counter of the current second only: it is neither written to the AOF nor sent to
-- replicas (lost on a restart or failover, harmlessly), so that, with appendfsync
-- always, counting a request is not an fsync every request waits for.
redis.set_repl(redis.REPL_NONE)
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 2) end
return n
"""
# A block is at most this share of the limit (and at least one request)...
LEASE_SHARE = 16
# ...and about this share of the requests the principal made here in its last second.
RATE_SHARE = 8
MAX_TRACKED = 10_000


class _Allowance:
    """One principal's tokens in this process: those of the current second, and how
    many requests it made in the second before."""

    __slots__ = ("granted", "last", "second", "used")

    def __init__(self, second: int) -> None:
        self.second = second
        self.granted = 0
        self.used = 0
        self.last = 0


class RateLimiter:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = keys
        self.clock = clock
        self._script = client.register_script(RATE_LUA)
        self._allowances: dict[str, _Allowance] = {}

    def _allowance(self, principal: str, second: int) -> _Allowance:
        found = self._allowances.get(principal)
        if found is None:
            if len(self._allowances) >= MAX_TRACKED:
                self._allowances.clear()
            found = self._allowances[principal] = _Allowance(second)
        elif found.second != second:
            found.last = found.used if found.second == second - 1 else 0
            found.second, found.granted, found.used = second, 0, 0
        return found

    async def admit(self, principal: str, per_second: int) -> bool:
        """Whether one more request of ``principal`` fits in this second's limit."""
        second = int(self.clock())
        allowance = self._allowance(principal, second)
        if allowance.used < allowance.granted:
            allowance.used += 1
            return True
        block = max(1, min(per_second // LEASE_SHARE, allowance.last // RATE_SHARE))
        key = f"{self.keys.prefix}:{{rate:{principal}}}:{second}"
        count: Any = await guarded(self._script(keys=[key], args=[block]))
        # What the counter had left of the limit before this block, up to the block.
        got = max(0, min(block, per_second - (int(count) - block)))
        if allowance.second != second:  # the second turned during the round trip
            return got > 0
        allowance.granted += got
        if allowance.used < allowance.granted:
            allowance.used += 1
            return True
        return False
