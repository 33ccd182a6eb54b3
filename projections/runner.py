"""The projection runner: folds each stream into its stored snapshot.

One *unit* is one stream with its snapshot: the registry, and each super. A runner holds
a lease on a unit before it projects it, so that with several ``worker`` processes each
unit has one writer at a time and events are folded strictly in order. Entries are read
through a consumer group (``catalog``); they are acknowledged inside the same atomic
commit that writes the snapshot and moves the checkpoint (``SnapshotStore``). On taking
over a unit, the runner claims what the previous holder left pending and skips every
entry at or before the stored checkpoint, so a crash at any point neither loses an event
nor applies one twice.

``run_until_caught_up`` is burst mode: it drains every stream and returns, for tests and
the ``replay`` command.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from events.errors import Unavailable
from events.model import Event, decode_event, stream_id_tuple
from events.redis_log import Keys, guarded
from projections.catalog import (
    RegistryState,
    SuperState,
    apply_registry,
    apply_super,
)
from projections.store import CATALOG, SnapshotStore

log = logging.getLogger("ledgerlake.projections")

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class _Unit:
    """One stream and the state folded from it."""

    name: str
    stream: str
    lease: str
    state: Any
    fold: Callable[[Any, Event], Any]
    commit: Callable[[Any, str, set[str], list[str]], Awaitable[bool]]
    claimed: bool = False
    changed: set[str] = field(default_factory=set)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class CatalogProjector:
    """Keeps the stored catalog snapshots (registry and supers) up to date."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        store: SnapshotStore,
        *,
        consumer: str | None = None,
        batch: int = 1000,
        lease_ms: int = 15_000,
        block_ms: int = 1_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.store = store
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.lease_ms = lease_ms
        self.block_ms = block_ms
        self.units: dict[str, _Unit] = {}
        self.applied = 0
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)

    # -- public -----------------------------------------------------------------------

    async def run_until_caught_up(self) -> int:
        """Drain every stream this runner can lease; return the events applied."""
        before = self.applied
        while await self._cycle(block=False):
            pass
        return self.applied - before

    async def run(self, stop: anyio.Event) -> None:
        """Project until ``stop`` is set, riding out Redis outages."""
        try:
            while not stop.is_set():
                try:
                    await self._cycle(block=True)
                except Unavailable as exc:
                    log.warning("projection paused: %s", exc)
                    await self._pause(stop)
                except Exception:
                    # A bug or a poison event must not take the API down with it; the
                    # lag in /health shows that projection is stuck.
                    log.exception("projection cycle failed; retrying")
                    await self._pause(stop)
        finally:
            with anyio.CancelScope(shield=True):
                await self.release_all()

    async def _pause(self, stop: anyio.Event) -> None:
        self.units.clear()
        with anyio.move_on_after(1.0):
            await stop.wait()

    async def release_all(self) -> None:
        for unit in list(self.units.values()):
            try:
                await self._release(keys=[unit.lease], args=[self.consumer])
            except Exception:  # best effort on shutdown: the lease expires anyway
                log.debug("could not release %s", unit.lease)
        self.units.clear()

    # -- one cycle --------------------------------------------------------------------

    async def _cycle(self, *, block: bool) -> bool:
        """Acquire units, read one batch from each, commit. True if anything was read."""
        await self._acquire(self._registry_unit_spec())
        registry = self.units.get("registry")
        progressed = False
        if registry is not None:
            progressed |= await self._step(registry)
            for org in registry.state.orgs.values():
                for sup in org.supers:
                    await self._acquire(self._super_unit_spec(org.name, sup))
        for unit in list(self.units.values()):
            if unit.name != "registry":
                progressed |= await self._step(unit)
        if not progressed and block:
            progressed = await self._wait_for_entries()
        return progressed

    async def _wait_for_entries(self) -> bool:
        """Block until any held stream has new entries (without consuming them)."""
        if not self.units:
            return False
        # XREAD (not XREADGROUP) so nothing is delivered twice: the next cycle reads.
        ids: dict[Any, Any] = {u.stream: u.state.position for u in self.units.values()}
        reply = await guarded(self.client.xread(ids, count=1, block=self.block_ms))
        return bool(reply)

    async def _step(self, unit: _Unit) -> bool:
        if not unit.claimed:
            await self._claim_pending(unit)
            unit.claimed = True
            pending = await self._read(unit, "0")
            if pending:
                return await self._apply(unit, pending)
        entries = await self._read(unit, ">")
        if not entries:
            return False
        return await self._apply(unit, entries)

    async def _read(self, unit: _Unit, start: str) -> list[tuple[Any, Any]]:
        reply: Any = await guarded(
            self.client.xreadgroup(CATALOG, self.consumer, {unit.stream: start}, count=self.batch)
        )
        if not reply:
            return []
        entries: list[tuple[Any, Any]] = reply[0][1]
        return [(eid, fields) for eid, fields in entries if fields]

    async def _apply(self, unit: _Unit, entries: list[tuple[Any, Any]]) -> bool:
        expected = unit.state.position
        state = unit.state
        acks: list[str] = []
        changed: set[str] = set()
        base = stream_id_tuple(expected)
        for raw_id, fields in entries:
            eid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            acks.append(eid)
            if stream_id_tuple(eid) <= base:
                continue  # folded in before a crash; only the ack was lost
            event = decode_event(eid, fields)
            state = unit.fold(state, event)
            if event.table:
                changed.add(event.table)
            self.applied += 1
        ok = await unit.commit(state, expected, changed, acks)
        if not ok:
            # Someone else moved the checkpoint (our lease lapsed): start over from it.
            log.warning("lost %s to another runner; reloading", unit.name)
            self.units.pop(unit.name, None)
            return True
        unit.state = state
        return True

    async def _claim_pending(self, unit: _Unit) -> None:
        start = "0-0"
        while True:
            reply = await guarded(
                self.client.xautoclaim(unit.stream, CATALOG, self.consumer, 0, start, count=1000)
            )
            start = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            if start == "0-0":
                return

    # -- units ------------------------------------------------------------------------

    def _registry_unit_spec(self) -> tuple[str, str, str]:
        tag = self.keys.registry_tag
        return ("registry", self.keys.registry_stream, f"{tag}:lease:{CATALOG}")

    def _super_unit_spec(self, org: str, sup: str) -> tuple[str, str, str]:
        return (
            f"{org}/{sup}",
            self.keys.stream(org, sup),
            self.keys.lease(org, sup, CATALOG),
        )

    async def _acquire(self, spec: tuple[str, str, str]) -> None:
        name, stream, lease = spec
        got = await guarded(self._renew(keys=[lease], args=[self.consumer, self.lease_ms]))
        if not got:
            self.units.pop(name, None)
            return
        if name in self.units:
            return
        try:
            await guarded(self.client.xgroup_create(stream, CATALOG, id="0", mkstream=True))
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if name == "registry":
            registry = await self.store.load_registry()

            async def commit_registry(
                state: RegistryState, expected: str, _changed: set[str], acks: list[str]
            ) -> bool:
                return await self.store.commit_registry(
                    state, expected=expected, group=CATALOG, acks=acks
                )

            self.units[name] = _Unit(name, stream, lease, registry, apply_registry, commit_registry)
            return
        org, sup = name.split("/", 1)
        state = await self.store.load_super(org, sup)

        async def commit_super(
            state: SuperState, expected: str, changed: set[str], acks: list[str]
        ) -> bool:
            return await self.store.commit_super(
                state, expected=expected, changed=sorted(changed), group=CATALOG, acks=acks
            )

        self.units[name] = _Unit(name, stream, lease, state, apply_super, commit_super)
