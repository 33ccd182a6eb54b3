"""Strongly consistent catalog reads: the stored snapshot plus a fold of the log's tail.

Every read asks the log for the events after the position this process has already
folded (one XRANGE round trip, usually empty) and folds them in. A read therefore sees
every write acknowledged before it started, whether or not a projection runner is alive
or caught up: read-your-writes across API pods with no sleeps and no client tokens.
The stored snapshot is only the fast start for a process that has no state cached.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from events.errors import Gone, NotFound
from events.model import stream_id_tuple
from events.redis_log import RedisEventLog
from projections.catalog import (
    RegistryState,
    SuperState,
    TableState,
    apply_table,
    fold_registry,
    fold_super,
)
from projections.store import SnapshotStore

PAGE = 5000


class CatalogReader:
    """Current catalog state, cached per super and brought up to date on every read."""

    def __init__(self, log: RedisEventLog, store: SnapshotStore, *, max_cached: int = 256):
        self.log = log
        self.store = store
        self.max_cached = max_cached
        self._supers: OrderedDict[tuple[str, str], SuperState] = OrderedDict()
        self._registry: RegistryState | None = None
        # Past versions never change.
        # (org, super, table, incarnation, version) -> state.
        self._versions: OrderedDict[tuple[str, str, str, str, int], TableState] = OrderedDict()

    async def registry(self) -> RegistryState:
        state = self._registry or await self.store.load_registry()
        while True:
            events = await self.log.read_registry(after=state.position, count=PAGE)
            state = fold_registry(state, events)
            if len(events) < PAGE:
                break
        if self._registry is None or _newer_or_same(state.position, self._registry.position):
            self._registry = state
        return state

    async def super_state(self, org: str, super_: str) -> SuperState:
        key = (org, super_)
        state = self._supers.get(key) or await self.store.load_super(org, super_)
        while True:
            events = await self.log.read(org, super_, after=state.position, count=PAGE)
            state = fold_super(state, events)
            if len(events) < PAGE:
                break
        cached = self._supers.get(key)
        if cached is None or _newer_or_same(state.position, cached.position):
            self._supers[key] = state
        self._supers.move_to_end(key)
        while len(self._supers) > self.max_cached:
            self._supers.popitem(last=False)
        return state

    async def require_super(self, org: str, super_: str) -> SuperState:
        """The super's state; NotFound if the org or super does not exist."""
        registry = await self.registry()
        org_info = registry.orgs.get(org)
        if org_info is None:
            raise NotFound(f"org {org!r} does not exist", code="org_not_found")
        if super_ not in org_info.supers:
            raise NotFound(f"super {org}/{super_} does not exist", code="super_not_found")
        return await self.super_state(org, super_)

    async def require_table(self, org: str, super_: str, table: str) -> TableState:
        state = await self.require_super(org, super_)
        found = state.tables.get(table)
        if found is None:
            raise NotFound(f"table {org}/{super_}/{table} does not exist", code="table_not_found")
        return found

    async def table_at(
        self,
        org: str,
        super_: str,
        table: str,
        *,
        version: int | None = None,
        at: datetime | None = None,
    ) -> TableState:
        """The table as of ``version``, or as of the instant ``at`` (the last version
        committed at or before it). NotFound for a version that never existed, Gone for
        one that was expired."""
        current = await self.require_table(org, super_, table)
        if version is not None and version > current.version:
            raise NotFound(
                f"table {org}/{super_}/{table} has no version {version} "
                f"(the current one is {current.version})",
                code="version_not_found",
                current_version=current.version,
            )
        if version is not None and version < 0:
            raise NotFound(f"there is no version {version}", code="version_not_found")
        if version == current.version:
            return current
        if at is not None and at >= current.updated_at:
            return current
        if version is not None:
            self._check_retained(org, super_, current, version)
            cached = self._versions.get((org, super_, table, current.incarnation, version))
            if cached is not None:
                return cached
        state = await self._fold_table(
            org, super_, table, current.incarnation, version=version, at=at
        )
        if state is None:
            raise NotFound(
                f"table {org}/{super_}/{table} did not exist at {at.isoformat() if at else ''}",
                code="version_not_found",
            )
        if version is not None and state.version != version:
            # Before this table's first version: a dropped table's, or never there.
            raise NotFound(
                f"table {org}/{super_}/{table} has no version {version} (it was created "
                f"at version {state.version})",
                code="version_not_found",
                current_version=current.version,
            )
        self._check_retained(org, super_, current, state.version)
        self._versions[(org, super_, table, current.incarnation, state.version)] = state
        while len(self._versions) > self.max_cached * 4:
            self._versions.popitem(last=False)
        return state

    @staticmethod
    def _check_retained(org: str, super_: str, current: TableState, version: int) -> None:
        if version < current.retained_from:
            raise Gone(
                f"version {version} of table {org}/{super_}/{current.name} has expired; "
                f"the oldest retained version is {current.retained_from}",
                retained_from=current.retained_from,
                current_version=current.version,
            )

    async def _fold_table(
        self,
        org: str,
        super_: str,
        table: str,
        incarnation: str,
        *,
        version: int | None,
        at: datetime | None,
    ) -> TableState | None:
        """Fold the events of one incarnation of a table (from its ``TableCreated``
        event on) up to a version or an instant. (Costs a scan of the super's stream;
        a per-table index would avoid it.)"""
        state: TableState | None = None
        after = _before(incarnation)
        while True:
            events = await self.log.read(org, super_, after=after, count=PAGE)
            for event in events:
                if event.table != table:
                    continue
                if at is not None and event.time > at:
                    return state
                state = apply_table(event, state)
                if state is None:  # dropped: cannot happen within the current incarnation
                    return None
                if version is not None and state.version >= version:
                    return state
            if len(events) < PAGE:
                return state
            after = events[-1].id

    async def version_times(self, org: str, super_: str, table: str) -> list[tuple[int, datetime]]:
        """(version, commit time) of every version of the table's current incarnation,
        oldest first."""
        current = await self.require_table(org, super_, table)
        out: list[tuple[int, datetime]] = []
        after = _before(current.incarnation)
        while True:
            events = await self.log.read(org, super_, after=after, count=PAGE)
            out.extend((e.version, e.time) for e in events if e.table == table)
            if len(events) < PAGE:
                return out
            after = events[-1].id


def _before(entry_id: str) -> str:
    """The position just before ``entry_id`` (reading "after" it includes the entry)."""
    if not entry_id:
        return "0-0"
    ms, seq = stream_id_tuple(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def _newer_or_same(a: str, b: str) -> bool:
    return stream_id_tuple(a) >= stream_id_tuple(b)
