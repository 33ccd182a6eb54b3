"""The mirror runner: one per format, a projection on its own consumer group.

It reuses the catalog runner's machinery (``projections/runner.py``): a lease per super,
entries read through the group ``mirror-<format>``, and one atomic Redis step per batch
that moves the checkpoint, acknowledges the entries and writes the mirror statuses
(``mirrors/status.py``). It folds the events into its own copy of the catalog state and,
for every table a batch changed, publishes the table's *latest* version (intermediate
versions inside one batch are skipped: the mirrors are latest-only).

Start-up: the unit starts from the stored catalog snapshot. If the snapshot is behind
the mirror checkpoint, the events in between are folded (already published); if it is
ahead, every table whose last change is newer than what its mirror reflects is
published. So a runner restarted at any point resumes without skipping a change; and
since each publish first compares the table with the mirror's own last commit (its
``ledgerlake.position``), it never commits a change twice.

A table whose publish fails (a storage error, a file a library rejects) gets the error
in its status (counted in ``/health`` and ``/metrics``) and does not block the other
tables; it is retried with backoff (1 s doubling to 5 min), on its next change and
whenever the runner starts. An unreachable Redis pauses the runner.

The runner holds the super's lease while it publishes: a background heartbeat renews
it during long publishes and each table's publish first checks it, so two runners
never write the same mirrors (the only writer assumption behind Delta's plain PUTs on
S3). A runner that loses the lease stops and reloads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import redis.asyncio as aioredis

from events.errors import Unavailable
from events.model import decode_event, stream_id_tuple
from events.redis_log import Keys, guarded
from mirrors.status import MirrorStatus, MirrorStatuses, encode_status, group
from projections.catalog import SuperState, TableState, apply_super
from projections.runner import CatalogProjector, _Staged, _Unit
from projections.store import CommitOutcome, SnapshotStore

if TYPE_CHECKING:  # (pyiceberg and deltalake load only where mirrors are published)
    from mirrors.publisher import Publisher

log = logging.getLogger("ledgerlake.mirrors")
PAGE = 1000
RETRY_S = 1.0
MAX_RETRY_S = 300.0
# Events wait this long for their publish, gathering others (latest-only mirrors)...
PUBLISH_DELAY_S = 0.2
# ...and this long when they publish nothing (no table of this format changed).
IDLE_COMMIT_DELAY_S = 1.0


class LeaseLost(Exception):
    """The runner lost a super's lease in the middle of publishing: it stops writing
    that super's mirrors (the run loop reloads)."""


class MirrorRunner(CatalogProjector):
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        store: SnapshotStore,
        publisher: Publisher,
        *,
        default_formats: tuple[str, ...],
        consumer: str | None = None,
        batch: int = 1000,
        lease_ms: int = 15_000,
        block_ms: int = 1_000,
    ) -> None:
        super().__init__(
            client,
            keys,
            store,
            consumer=consumer,
            batch=batch,
            lease_ms=lease_ms,
            block_ms=block_ms,
        )
        self.publisher = publisher
        self.fmt = publisher.fmt
        self.group = group(self.fmt)
        self.statuses = MirrorStatuses(client, keys)
        self.default_formats = default_formats
        self._status: dict[str, dict[str, MirrorStatus]] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self.published = 0

    def enabled(self, table: TableState) -> bool:
        formats = table.mirrors if table.mirrors is not None else self.default_formats
        return self.fmt in formats

    def _commit_delay(self, staged: _Staged) -> float:
        """How long events may gather before they are published. Mirrors are latest-
        only: one publish covers every write that came meanwhile, so under a stream
        of writes a short delay saves a Delta or Iceberg commit per write (each is
        tens of milliseconds of the same process's CPU). When no table of this format
        changed, the commit only moves the checkpoint, and waits longer."""
        tables = staged.state.tables
        if any(name not in tables or self.enabled(tables[name]) for name in staged.changed):
            return PUBLISH_DELAY_S
        return IDLE_COMMIT_DELAY_S

    def _specs(self) -> list[tuple[str, str, str]]:
        specs = []
        for org in self._registry_view.orgs.values():
            specs += [self._super_spec(org.name, sup) for sup in org.supers]
        return specs

    async def _acquire_super(self, name: str, stream: str, lease: str) -> None:
        org, sup = name.split("/", 1)
        state = await self.store.load_super(org, sup)
        raw: Any = await guarded(self.client.get(self.keys.checkpoint(org, sup, self.group)))
        checkpoint = raw.decode() if raw else "0-0"
        # Fold up to what the group already delivered, too: entries delivered and
        # acknowledged past a lost checkpoint would otherwise never be read again.
        delivered = await self._delivered(stream)
        target = max(checkpoint, delivered, key=stream_id_tuple)
        state = await self._fold_until(state, stream, target)
        self._status[name] = await self.statuses.of_super(org, sup, self.fmt)

        async def commit(
            state: Any, expected: str, changed: set[str], acks: list[str], folded: int
        ) -> CommitOutcome:
            return await self._commit(name, lease, state, expected, changed, acks, folded)

        unit = _Unit(name, stream, lease, state, apply_super, commit)
        # Catch up with what changed while no runner was publishing (and retry the
        # tables whose last publish failed).
        statuses = self._status[name]
        dirty = {t for t in statuses if t not in state.tables or statuses[t].error}
        for table in state.tables.values():
            status = statuses.get(table.name)
            if (
                status is None
                or status.incarnation != table.incarnation
                or _before(status.position, table.last_event_id)
                or not self.enabled(table)
            ):
                dirty.add(table.name)
        if dirty or state.position != checkpoint:
            outcome = await self._commit(name, lease, state, checkpoint, dirty, [], -1)
            if outcome is not CommitOutcome.DONE:
                return  # another runner moved on: try again next cycle
        self.units[name] = unit

    async def _delivered(self, stream: str) -> str:
        """The group's last delivered entry id."""
        groups: Any = await guarded(self.client.xinfo_groups(stream))
        for info in groups:
            name = info.get("name") or info.get(b"name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                raw = info.get("last-delivered-id") or info.get(b"last-delivered-id") or "0-0"
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        return "0-0"

    async def _fold_until(self, state: SuperState, stream: str, checkpoint: str) -> SuperState:
        """Fold the events after the snapshot up to ``checkpoint`` (when the catalog
        snapshot is behind this mirror)."""
        while stream_id_tuple(state.position) < stream_id_tuple(checkpoint):
            entries: Any = await guarded(
                self.client.xrange(stream, min=f"({state.position}", max=checkpoint, count=PAGE)
            )
            if not entries:
                break
            for eid, fields in entries:
                state = apply_super(state, decode_event(eid, fields))
        return state

    async def _cycle(self, *, block: bool) -> bool:
        progressed = await super()._cycle(block=block)
        await self._retry_failed()
        return progressed

    async def _retry_failed(self) -> None:
        """Publish again, with backoff, the tables whose last publish failed (a storage
        blip must not leave a mirror stale until the table's next write)."""
        now = time.monotonic()
        for name, unit in list(self.units.items()):
            failed = {t for t, st in self._status.get(name, {}).items() if st.error}
            if not failed or self._retry_at.get(name, 0.0) > now:
                continue
            state = unit.state
            outcome = await self._commit(name, unit.lease, state, state.position, failed, [], -1)
            if outcome is not CommitOutcome.DONE:
                self.units.pop(name, None)  # another runner moved on: reload

    async def _commit(
        self,
        name: str,
        lease: str,
        state: SuperState,
        expected: str,
        changed: set[str],
        acks: list[str],
        folded: int,
    ) -> CommitOutcome:
        """Publish every changed table (holding the lease: renewed in the background
        while the libraries work, checked before each table), then commit."""
        org, sup = name.split("/", 1)
        statuses = dict(self._status.get(name, {}))
        sets: list[tuple[str, bytes]] = []
        removed: list[str] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, lease)
                await self._publish_all(org, sup, lease, state, changed, statuses, sets, removed)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the task group wraps what the body raised
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if any(st.error for st in statuses.values()):
            delay = min(MAX_RETRY_S, RETRY_S * 2 ** self._failures.get(name, 0))
            self._failures[name] = self._failures.get(name, 0) + 1
            self._retry_at[name] = time.monotonic() + delay
        else:
            self._failures.pop(name, None)
        keys = [
            self.statuses.key(org, sup, self.fmt),
            self.keys.checkpoint(org, sup, self.group),
            self.keys.stream(org, sup),
        ]
        outcome = await self.store.commit_hash(
            keys, (expected, state.position, self.group, folded), sets, removed, acks
        )
        if outcome is CommitOutcome.DONE:
            self._status[name] = statuses
        return outcome

    async def _publish_all(
        self,
        org: str,
        sup: str,
        lease: str,
        state: SuperState,
        changed: set[str],
        statuses: dict[str, MirrorStatus],
        sets: list[tuple[str, bytes]],
        removed: list[str],
    ) -> None:
        for table_name in sorted(changed):
            table = state.tables.get(table_name)
            previous = statuses.get(table_name)
            if table is not None and self.enabled(table):
                if (
                    previous is not None
                    and previous.error is None
                    and previous.incarnation == table.incarnation
                    and not _before(previous.position, table.last_event_id)
                ):
                    continue
                await self._hold(lease)
                status = await self._publish(org, sup, table, previous)
                statuses[table_name] = status
                sets.append((table_name, encode_status(status)))
            elif previous is not None:
                await self._hold(lease)
                failure = await self._remove(org, sup, table_name, previous)
                if failure is None:
                    del statuses[table_name]
                    removed.append(table_name)
                else:
                    statuses[table_name] = failure
                    sets.append((table_name, encode_status(failure)))

    async def _heartbeat(self, lease: str) -> None:
        """Keep the lease while a publish runs longer than a cycle."""
        while True:
            await anyio.sleep(self.lease_ms / 3000)
            await self._hold(lease)

    async def _hold(self, lease: str) -> None:
        """Renew the lease, or stop: another runner may be writing these mirrors."""
        if not await guarded(self._renew(keys=[lease], args=[self.consumer, self.lease_ms])):
            raise LeaseLost(f"lease {lease} lost while publishing mirrors")

    async def _remove(
        self, org: str, sup: str, table: str, previous: MirrorStatus
    ) -> MirrorStatus | None:
        """Remove a mirror (dropped table, format off); the failed status on error."""
        try:
            await self.publisher.remove(org, sup, table)
        except Unavailable:
            raise
        except Exception as exc:
            log.exception("removing the %s mirror of %s/%s/%s failed", self.fmt, org, sup, table)
            return MirrorStatus(**{**_fields(previous), "error": f"{type(exc).__name__}: {exc}"})
        return None

    async def _publish(
        self, org: str, sup: str, table: TableState, previous: MirrorStatus | None
    ) -> MirrorStatus:
        try:
            status = await self.publisher.publish(org, sup, table, previous)
        except Unavailable:
            raise
        except Exception as exc:  # one table must not block the others
            log.exception("%s mirror of %s/%s/%s failed", self.fmt, org, sup, table.name)
            message = f"{type(exc).__name__}: {exc}"[:500]
            if previous is not None:
                return MirrorStatus(**{**_fields(previous), "error": message})
            return MirrorStatus(
                format=self.fmt,
                location=self.publisher.access.uri(f"{org}/{sup}/{table.name}"),
                version=-1,
                position="0-0",
                incarnation=table.incarnation,
                published_at=table.updated_at,
                error=message,
            )
        self.published += 1
        return status


def _fields(status: MirrorStatus) -> dict[str, Any]:
    return {f: getattr(status, f) for f in status.__struct_fields__}


def _before(a: str, b: str) -> bool:
    return stream_id_tuple(a or "0-0") < stream_id_tuple(b or "0-0")
