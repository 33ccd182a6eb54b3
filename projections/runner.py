"""The projection runner: folds each stream into its stored snapshot.

One *unit* is one stream with its snapshot: the registry, and each super. A runner holds
a lease on a unit before it projects it (renewed once a third of it has passed; a unit
whose renewal fails is dropped at once), so that with several ``worker`` processes
each unit has one writer at a time. Entries are read through a consumer group
(``catalog``) and acknowledged inside the same atomic commit that writes the snapshot
and moves the checkpoint (``SnapshotStore``).

Two checks in that commit make it safe even when leases overlap (a paused process whose
lease lapsed): the stored checkpoint must be the one the runner started from, and the
events folded must be *every* event between the old and the new checkpoint. If either
fails, nothing is written; the runner reloads the snapshot, claims every pending entry
of the group (``XAUTOCLAIM``) and reads them again in order. Entries at or before the
checkpoint are only acknowledged. So a crash or an overlap at any point neither loses an
event nor applies one twice.

While running, folded events are staged and committed at most ``commit_delay_s`` after
the first (one snapshot write for many events); ``run_until_caught_up`` is burst mode:
it drains every stream, committing as it goes, and returns, for tests and
``worker --burst``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from events.errors import Unavailable
from events.model import Event, decode_event, stream_id_tuple
from events.redis_log import Keys, guarded
from projections.catalog import RegistryState, apply_registry, apply_super, fold_registry
from projections.store import CATALOG, CommitOutcome, SnapshotStore

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

REGISTRY = "registry"
# How long a stopping runner may spend committing what it staged.
SHUTDOWN_FLUSH_S = 10.0
Commit = Callable[[Any, str, set[str], list[str], int], Awaitable[CommitOutcome]]


@dataclass
class _Unit:
    """One stream and the state folded from it."""

    name: str
    stream: str
    lease: str
    state: Any
    fold: Callable[[Any, Event], Any]
    commit: Commit
    # Where to continue reading this consumer's pending entries; None once drained.
    pending_from: str | None = "0"
    # When the lease was last renewed (monotonic): it is renewed a third of the way.
    renewed_at: float = field(default_factory=time.monotonic)
    # Events folded but not committed yet (``CatalogProjector.commit_delay_s``).
    staged: _Staged | None = None

    @property
    def folded(self) -> Any:
        """The state with every event read so far, committed or not."""
        return self.staged.state if self.staged is not None else self.state


@dataclass
class _Staged:
    """A commit waiting to be made: what was folded since the stored checkpoint."""

    state: Any
    since: float
    changed: set[str] = field(default_factory=set)
    acks: list[str] = field(default_factory=list)
    folded: int = 0


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
        commit_delay_s: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.store = store
        # While blocking (``run``), events are committed at most this long after the
        # first one folded: one snapshot write for many events. Readers fold the tail
        # past the snapshot themselves, so the delay is invisible to them; what it
        # saves is a rewrite of every changed table (2 MB for 10,000 files) per event.
        self.commit_delay_s = commit_delay_s
        self._stopping: anyio.Event | None = None  # set while ``run`` runs
        self._full_read = False
        self.consumer = consumer or default_consumer_name()
        self.batch = batch
        self.lease_ms = lease_ms
        self.block_ms = block_ms
        self.units: dict[str, _Unit] = {}
        self.group = CATALOG
        # Leases we may hold, including those of units dropped during an outage: on
        # shutdown each is released (compare-and-delete, so only if still ours).
        self._leases: set[str] = set()
        self.applied = 0
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        # Every runner follows the registry (to learn the supers) whether or not it
        # holds the registry's lease.
        self._registry_view = RegistryState()

    # -- public -----------------------------------------------------------------------

    async def run_until_caught_up(self) -> int:
        """Drain every stream this runner can lease; return the events applied."""
        before = self.applied
        while await self._cycle(block=False):
            pass
        return self.applied - before

    async def run(self, stop: anyio.Event) -> None:
        """Project until ``stop`` is set, riding out Redis outages."""
        self._stopping = stop
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
                # Best effort, and bounded (a mirror's flush publishes to storage):
                # what is not committed stays pending for the next runner.
                with anyio.move_on_after(SHUTDOWN_FLUSH_S):
                    for unit in list(self.units.values()):
                        try:
                            await self._flush(unit)
                        except Exception:
                            log.debug("could not commit %s on shutdown", unit.name)
                await self.release_all()

    async def release_all(self) -> None:
        for lease in sorted(self._leases):
            try:
                await self._release(keys=[lease], args=[self.consumer])
            except Exception:  # best effort on shutdown: the lease expires anyway
                log.debug("could not release %s", lease)
        self._leases.clear()
        self.units.clear()

    # -- one cycle --------------------------------------------------------------------

    async def _pause(self, stop: anyio.Event) -> None:
        self.units.clear()
        with anyio.move_on_after(self.block_ms / 1000):
            await stop.wait()

    async def _cycle(self, *, block: bool) -> bool:
        """Renew and acquire leases, read one batch per unit, commit. True if anything
        was read."""
        await self._follow_registry()
        await self._renew_held()
        for spec in self._specs():
            if spec[0] not in self.units:
                await self._acquire(spec)
        progressed = False
        self._full_read = False  # a full batch: more is waiting, gather nothing
        for unit in list(self.units.values()):
            progressed |= await self._step(unit)
        due = None
        for unit in list(self.units.values()):
            if unit.staged is None:
                continue
            left = unit.staged.since + self._commit_delay(unit.staged) - time.monotonic()
            if not block or left <= 0 or unit.staged.folded >= self.batch:
                await self._flush(unit)
            else:
                due = left if due is None else min(due, left)
        if (
            block
            and progressed
            and not self._full_read
            and due is not None
            and self._stopping is not None
        ):
            # Events keep coming and a commit is staged: let them gather until it is
            # due (one read and one commit per delay, not two cycles per event).
            with anyio.move_on_after(due):
                await self._stopping.wait()
        elif not progressed and block:
            await self._wait_for_entries(due)
        return progressed

    def _specs(self) -> list[tuple[str, str, str]]:
        """The units this runner projects: the registry and every super."""
        specs = [self._registry_spec()]
        for org in self._registry_view.orgs.values():
            specs += [self._super_spec(org.name, sup) for sup in org.supers]
        return specs

    async def _follow_registry(self) -> None:
        entries: Any = await guarded(
            self.client.xrange(
                self.keys.registry_stream, min=f"({self._registry_view.position}", max="+"
            )
        )
        events = [decode_event(eid, fields) for eid, fields in entries]
        self._registry_view = fold_registry(self._registry_view, events)

    async def _renew_held(self) -> None:
        """Renew each lease held once a third of it has passed (not every cycle: each
        renewal is a write, fsync'd with the rest of Redis's writes)."""
        for name, unit in list(self.units.items()):
            now = time.monotonic()
            if now - unit.renewed_at < self.lease_ms / 3000:
                continue
            if not await guarded(
                self._renew(keys=[unit.lease], args=[self.consumer, self.lease_ms])
            ):
                log.warning("lease on %s lost; dropping it", name)
                del self.units[name]
                self._leases.discard(unit.lease)
            else:
                unit.renewed_at = now

    async def _wait_for_entries(self, due: float | None = None) -> None:
        """Block until a held stream (or the registry) has new entries, or ``block_ms``
        (or ``due`` seconds, when a staged commit is due sooner).

        XREAD, not XREADGROUP, so nothing is delivered here: the next cycle reads."""
        ids: dict[Any, Any] = {u.stream: u.folded.position for u in self.units.values()}
        ids.setdefault(self.keys.registry_stream, self._registry_view.position)
        if isinstance(self.client, RedisCluster):
            # One XREAD may not span slots on a Cluster: wait on the registry only,
            # which bounds the projection delay of other streams by block_ms.
            ids = {self.keys.registry_stream: self._registry_view.position}
        block = self.block_ms if due is None else max(1, min(self.block_ms, int(due * 1000)))
        await guarded(self.client.xread(ids, count=1, block=block))

    async def _step(self, unit: _Unit) -> bool:
        if unit.pending_from is not None:
            entries = await self._read(unit, unit.pending_from)
            if entries:
                unit.pending_from = _decode(entries[-1][0])
                return await self._apply(unit, entries)
            unit.pending_from = None  # this consumer's pending entries are drained
        entries = await self._read(unit, ">")
        if entries:
            return await self._apply(unit, entries)
        if await self._behind(unit):
            # Nothing new to deliver, yet the stream is past our position: the entries
            # sit in another consumer's pending list (a runner that lost its lease, or a
            # read whose reply was lost). Claim them and read them in order.
            await self._claim_pending(unit.stream)
            unit.pending_from = "0"
            return True
        return False

    async def _behind(self, unit: _Unit) -> bool:
        newest: Any = await guarded(self.client.xrevrange(unit.stream, count=1))
        return bool(newest) and stream_id_tuple(_decode(newest[0][0])) > stream_id_tuple(
            unit.folded.position
        )

    async def _read(self, unit: _Unit, start: str) -> list[tuple[Any, Any]]:
        reply: Any = await guarded(
            self.client.xreadgroup(
                self.group, self.consumer, {unit.stream: start}, count=self.batch
            )
        )
        if not reply:
            return []
        entries: list[tuple[Any, Any]] = reply[0][1]
        return [(eid, fields) for eid, fields in entries if fields]

    async def _apply(self, unit: _Unit, entries: list[tuple[Any, Any]]) -> bool:
        if len(entries) >= self.batch:
            self._full_read = True
        staged = unit.staged or _Staged(unit.state, time.monotonic())
        base = stream_id_tuple(staged.state.position)
        state = staged.state
        for raw_id, fields in entries:
            eid = _decode(raw_id)
            staged.acks.append(eid)
            if stream_id_tuple(eid) <= base:
                continue  # folded in before a crash, or already staged; ack it again
            event = decode_event(eid, fields)
            state = unit.fold(state, event)
            staged.folded += 1
            if event.table:
                staged.changed.add(event.table)
        staged.state = state
        unit.staged = staged
        if self._commit_delay(staged) <= 0:
            await self._flush(unit)
        return True

    def _commit_delay(self, staged: _Staged) -> float:
        """How long ``staged`` may wait for its commit while the runner blocks."""
        return self.commit_delay_s

    async def _flush(self, unit: _Unit) -> None:
        """Commit what ``unit`` has staged."""
        staged = unit.staged
        if staged is None:
            return
        unit.staged = None
        expected = unit.state.position
        outcome = await unit.commit(
            staged.state, expected, staged.changed, staged.acks, staged.folded
        )
        if outcome is CommitOutcome.DONE:
            unit.state = staged.state
            self.applied += staged.folded
            return
        # The checkpoint moved (another runner committed), or our batch skipped entries
        # delivered to another consumer: start over from the stored snapshot, with every
        # pending entry claimed so they are read again, in order.
        log.warning("%s: commit refused (%s); reloading", unit.name, outcome.name)
        del self.units[unit.name]
        await self._acquire((unit.name, unit.stream, unit.lease))

    async def _claim_pending(self, stream: str) -> None:
        start = "0-0"
        while True:
            reply: Any = await guarded(
                self.client.xautoclaim(stream, self.group, self.consumer, 0, start, count=1000)
            )
            start = _decode(reply[0])
            if start == "0-0":
                return

    # -- units ------------------------------------------------------------------------

    def _registry_spec(self) -> tuple[str, str, str]:
        tag = self.keys.registry_tag
        return (REGISTRY, self.keys.registry_stream, f"{tag}:lease:{CATALOG}")

    def _super_spec(self, org: str, sup: str) -> tuple[str, str, str]:
        return (f"{org}/{sup}", self.keys.stream(org, sup), self.keys.lease(org, sup, self.group))

    async def _acquire(self, spec: tuple[str, str, str]) -> None:
        """Take the unit's lease if free, load its snapshot and claim its pending entries."""
        name, stream, lease = spec
        if not await guarded(self._renew(keys=[lease], args=[self.consumer, self.lease_ms])):
            return
        self._leases.add(lease)
        try:
            await guarded(self.client.xgroup_create(stream, self.group, id="0", mkstream=True))
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._claim_pending(stream)
        if name == REGISTRY:
            registry = await self.store.load_registry()

            async def commit_registry(
                state: Any, expected: str, _changed: set[str], acks: list[str], folded: int
            ) -> CommitOutcome:
                return await self.store.commit_registry(
                    state, expected=expected, group=CATALOG, acks=acks, folded=folded
                )

            self.units[name] = _Unit(name, stream, lease, registry, apply_registry, commit_registry)
            return
        await self._acquire_super(name, stream, lease)

    async def _acquire_super(self, name: str, stream: str, lease: str) -> None:
        """Load a super's unit (its lease is held, its pending entries claimed)."""
        org, sup = name.split("/", 1)
        snapshot = await self.store.load_super(org, sup)

        async def commit_super(
            state: Any, expected: str, changed: set[str], acks: list[str], folded: int
        ) -> CommitOutcome:
            return await self.store.commit_super(
                state,
                expected=expected,
                changed=sorted(changed),
                group=CATALOG,
                acks=acks,
                folded=folded,
            )

        self.units[name] = _Unit(name, stream, lease, snapshot, apply_super, commit_super)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
