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
from events.storage import Storage
from projections.runner import RELEASE_LUA, RENEW_LUA, default_consumer_name

log = logging.getLogger("ledgerlake.archive")
ARCHIVE = "archive"
FLUSH_S = 10.0


@dataclass(frozen=True)
class Unit:
    name: str  # the archive's name for the stream
    stream: str  # the Redis stream
    lease: str
    checkpoint: str


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
        lease_ms: int = 30_000,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.archive = Archive(storage)
        self.supers = supers
        self.segment_events = segment_events
        self.interval_s = interval_s
        self.lease_ms = lease_ms
        self.consumer = consumer or default_consumer_name()
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
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
        return written

    async def release_all(self) -> None:
        """Give up every lease (burst mode, shutdown)."""
        for unit in units(self.keys, await self.supers()):
            if unit.name in self._manifests:
                await guarded(self._release(keys=[unit.lease], args=[self.consumer]))
        self._manifests.clear()
