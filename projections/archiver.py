"""The archiver: a projection that copies every stream (the registry, the auth stream,
the query audit and each super's) into the archive in the object storage (``events/archive.py``).

Each stream is a unit with a lease, as for the other runners, so one process writes a
stream's archive at a time. A unit's position is the archive's own (the last id its
manifest commits), read from the storage when the lease is taken: Redis only keeps a
copy (``<tag>:ckpt:archive``) for the lag in ``/health`` and ``/metrics``. A segment is
written when ``segment_events`` entries are waiting, or when the oldest waiting entry
is ``interval_s`` old, so the archive is at most about that far behind, and an idle
stream makes no segments. Before each segment the lease is renewed: a runner that lost
it stops writing that stream (segments have unique names, so a late write of a runner
that lost its lease leaves an unreferenced file, never a changed one)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis

from events.archive import AUDIT, AUTH, REGISTRY, Archive, Manifest, entry_of, super_stream
from events.errors import Unavailable
from events.redis_log import Keys, guarded
from events.storage.port import Storage
from projections.runner import RELEASE_LUA, RENEW_LUA, default_consumer_name

log = logging.getLogger("ledgerlake.archive")
ARCHIVE = "archive"
FLUSH_S = 10.0

TRIM_LUA = """
-- KEYS: stream, trimmed mark, then the checkpoint of every projection of the stream
-- ARGV: the archive's position, the retention cutoff (ms)
-- Trims the entries that are archived, applied by every projection and older than the
-- retention; the mark is the lowest id kept (readers take what is below from the archive).
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local low = ARGV[1]
for i = 3, #KEYS do
  local c = redis.call('GET', KEYS[i])
  if not c then return 0 end  -- a projection that never ran here: keep everything
  if less(c, low) then low = c end
end
local dash = string.find(low, '-', 1, true)
local next_seq = tonumber(string.sub(low, dash + 1)) + 1
local minid = string.sub(low, 1, dash - 1) .. '-' .. tostring(next_seq)
local cutoff = ARGV[2] .. '-0'
if less(cutoff, minid) then minid = cutoff end
local mark = redis.call('GET', KEYS[2])
if mark and not less(mark, minid) then return 0 end
-- the mark first: in the same script, so no reader sees the trim without it
redis.call('SET', KEYS[2], minid)
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"""


@dataclass(frozen=True)
class Unit:
    name: str  # the archive's name for the stream
    stream: str  # the Redis stream
    lease: str
    checkpoint: str
    org: str = ""  # a super's stream (the only ones trimmed)
    super_: str = ""


def units(keys: Keys, supers: list[tuple[str, str]]) -> list[Unit]:
    """Every stream the archiver copies."""
    out = [
        Unit(REGISTRY, keys.registry_stream, f"{keys.registry_tag}:lease:{ARCHIVE}",
             f"{keys.registry_tag}:ckpt:{ARCHIVE}"),
        Unit(AUTH, keys.auth_stream, f"{keys.auth_tag}:lease:{ARCHIVE}",
             f"{keys.auth_tag}:ckpt:{ARCHIVE}"),
        Unit(AUDIT, keys.audit_stream, f"{keys.audit_tag}:lease:{ARCHIVE}",
             f"{keys.audit_tag}:ckpt:{ARCHIVE}"),
    ]  # fmt: skip
    for org, sup in supers:
        out.append(
            Unit(
                super_stream(org, sup),
                keys.stream(org, sup),
                keys.lease(org, sup, ARCHIVE),
                keys.checkpoint(org, sup, ARCHIVE),
                org,
                sup,
            )
        )
    return out


class Archiver:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        storage: Storage,
        supers: Callable[[], Awaitable[list[tuple[str, str]]]],
        *,
        segment_events: int = 10_000,
        interval_s: float = 5.0,
        retention_s: float = 0.0,
        projections: tuple[str, ...] = (),
        lease_ms: int = 30_000,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.archive = Archive(storage)
        self.supers = supers
        self.segment_events = segment_events
        self.interval_s = interval_s
        # Super streams keep this long of history in Redis (0: all of it); older entries
        # that every projection in ``projections`` has applied are trimmed once archived.
        self.retention_s = retention_s
        self.projections = projections
        self.lease_ms = lease_ms
        self.consumer = consumer or default_consumer_name()
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._trim = client.register_script(TRIM_LUA)
        self._manifests: dict[str, Manifest] = {}  # the streams whose lease we hold

    async def run(self, stop: anyio.Event) -> None:
        """Archive until ``stop`` (or cancellation); an unreachable Redis or storage
        pauses it. On the way out, whatever is still waiting is archived (for up to
        ``FLUSH_S``), so a clean shutdown leaves nothing only in Redis."""
        try:
            while not stop.is_set():
                try:
                    await self.archive_once(force=False)
                except (Unavailable, OSError) as exc:  # retried; the lag shows it meanwhile
                    log.warning("archiving paused: %s", exc)
                    self._manifests.clear()
                except Exception:  # a bug or a damaged manifest: the other runners go on
                    log.exception("archiving failed; retrying")
                    self._manifests.clear()
                with anyio.move_on_after(min(self.interval_s, 1.0)):
                    await stop.wait()
        finally:
            with anyio.move_on_after(FLUSH_S, shield=True):
                try:
                    await self.archive_once(force=True)
                    await self.release_all()
                except (Unavailable, OSError) as exc:
                    log.warning("the last events were not archived on shutdown: %s", exc)

    async def archive_once(self, *, force: bool) -> int:
        """One pass over every stream: the entries written to new segments. With
        ``force`` every waiting entry is archived now (burst mode, tests, recovery
        drills); without, a stream waits for a full segment or for ``interval_s``."""
        total = 0
        for unit in units(self.keys, await self.supers()):
            if not await self._hold(unit):
                continue
            total += await self._archive(unit, force)
        return total

    async def _hold(self, unit: Unit) -> bool:
        held = await guarded(self._renew(keys=[unit.lease], args=[self.consumer, self.lease_ms]))
        if not held:
            self._manifests.pop(unit.name, None)
        return bool(held)

    async def _archive(self, unit: Unit, force: bool) -> int:
        manifest = self._manifests.get(unit.name)
        if manifest is None:  # a lease newly taken: the archive says where it is
            manifest = await self.archive.manifest(unit.name)
            self._manifests[unit.name] = manifest
        written = 0
        while True:
            raw: Any = await guarded(
                self.client.xrange(
                    unit.stream, min=f"({manifest.position}", max="+", count=self.segment_events
                )
            )
            if not raw:
                break
            full = len(raw) >= self.segment_events
            first_ms = int(entry_of(*raw[0])[0].split("-")[0])
            if not (full or force or time.time() * 1000 - first_ms >= self.interval_s * 1000):
                break  # a few fresh entries: wait for more, up to interval_s
            if not await self._hold(unit):
                return written
            manifest = await self.archive.append(manifest, [entry_of(i, f) for i, f in raw])
            self._manifests[unit.name] = manifest
            await guarded(self.client.set(unit.checkpoint, manifest.position))
            written += len(raw)
            if not full:
                break
        if self.retention_s > 0 and unit.org and written:
            # (after a new segment only: an idle stream costs no script call; a cut held
            # back by a projection moves on with the next segment)
            await self._trim_stream(unit, manifest)
        return written

    async def _trim_stream(self, unit: Unit, manifest: Manifest) -> int:
        """Trim what is archived, applied by every projection and past the retention."""
        if manifest.position == "0-0":
            return 0
        checkpoints = [self.keys.checkpoint(unit.org, unit.super_, p) for p in self.projections]
        cutoff = int((time.time() - self.retention_s) * 1000)
        removed = await guarded(
            self._trim(
                keys=[unit.stream, self.keys.trimmed(unit.org, unit.super_), *checkpoints],
                args=[manifest.position, max(cutoff, 0)],
            )
        )
        return int(removed)

    async def release_all(self) -> None:
        """Give up every lease (burst mode, shutdown)."""
        for unit in units(self.keys, await self.supers()):
            if unit.name in self._manifests:
                await guarded(self._release(keys=[unit.lease], args=[self.consumer]))
        self._manifests.clear()
