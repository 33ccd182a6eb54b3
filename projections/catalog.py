"""The catalog projection: a pure fold of events into the current catalog.

``apply_super`` folds one super's stream into a ``SuperState`` (tables, schemas,
versions, files); ``apply_registry`` folds the registry stream into the list of orgs and
supers. States are frozen; each event returns a new state that shares what did not
change. Every event advances ``position``, including the ones a fold ignores.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import singledispatch
from typing import Any

import msgspec

from events.model import (
    TABLE_EVENTS,
    ColumnStats,
    DataFile,
    DeletionVector,
    Event,
    EventBase,
    Field,
    FileDeletes,
    FilesReplaced,
    MirrorsChanged,
    OrgCreated,
    PoliciesSet,
    Policy,
    RowsAppended,
    SchemaEvolved,
    SuperCreated,
    TableCreated,
    TableDropped,
    TableOverwritten,
    TableRestored,
    VersionsExpired,
)
from events.positions import merge_positions


class TableState(msgspec.Struct, frozen=True, gc=False):
    """One table at one version."""

    name: str
    columns: tuple[Field, ...]
    version: int
    files: tuple[DataFile, ...]
    created_at: datetime
    updated_at: datetime
    created_by: str
    updated_by: str
    last_event_id: str
    # The oldest version that can still be queried or restored (VersionsExpired).
    retained_from: int = 0
    # The id of the TableCreated event of this table: a dropped and re-created table
    # is a new incarnation whose versions start again at 0.
    incarnation: str = ""
    # The version its TableCreated event has: 0, or more for a name whose earlier
    # table was dropped (a name's versions never repeat).
    created_version: int = 0
    # Mirror formats that publish the table; None: the LEDGERLAKE_MIRRORS default.
    mirrors: tuple[str, ...] | None = None
    # Row filters and column masks, per role (PoliciesSet).
    policies: tuple[Policy, ...] = ()

    @property
    def row_count(self) -> int:
        return sum(f.live_rows for f in self.files)

    @property
    def inline_files(self) -> tuple[DataFile, ...]:
        return tuple(f for f in self.files if f.is_inline)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def column_stats(self) -> dict[str, ColumnStats]:
        """Per-column stats over every current file (min of mins, max of maxes)."""
        out: dict[str, ColumnStats] = {}
        for field in self.columns:
            nulls, lo, hi, complete = 0, None, None, True
            for f in self.files:
                stats = f.columns.get(field.name)
                if stats is None:  # the file predates the column: all nulls
                    nulls += f.rows
                    continue
                nulls += stats.null_count
                if stats.min is None or stats.max is None:
                    complete = complete and stats.null_count == f.rows
                    continue
                key = _sort_key(field)
                lo = stats.min if lo is None else min(lo, stats.min, key=key)
                hi = stats.max if hi is None else max(hi, stats.max, key=key)
            if not complete:
                lo = hi = None
            out[field.name] = ColumnStats(null_count=nulls, min=lo, max=hi)
        return out


def _sort_key(field: Field) -> Callable[[Any], Any]:
    """Stats are JSON values: decimals are strings that must compare as numbers."""
    if field.type.kind == "decimal":
        return Decimal
    return lambda v: v


class SuperState(msgspec.Struct, frozen=True):
    """Every table of one super, as of stream position ``position``."""

    org: str
    name: str
    tables: dict[str, TableState] = {}
    position: str = "0-0"


class SuperInfo(msgspec.Struct, frozen=True):
    name: str
    created_at: datetime
    created_by: str


class OrgInfo(msgspec.Struct, frozen=True):
    name: str
    created_at: datetime
    created_by: str
    supers: dict[str, SuperInfo] = {}


class RegistryState(msgspec.Struct, frozen=True):
    """Every org and super, as of registry stream position ``position``."""

    orgs: dict[str, OrgInfo] = {}
    position: str = "0-0"


def apply_super(state: SuperState, event: Event) -> SuperState:
    """Fold one event of the super's stream into ``state``."""
    tables = state.tables
    if isinstance(event, TableDropped):
        tables = {name: t for name, t in tables.items() if name != event.table}
    elif isinstance(event, TABLE_EVENTS):
        updated = _apply_table(event, tables.get(event.table))
        tables = {**tables, event.table: updated}
    return msgspec.structs.replace(state, tables=tables, position=event.id)


class SuperFolder:
    """``apply_super`` for long folds (replay): the same tables, without copying every
    table's entry for every event, nor a table's file list for every append (appended
    files are gathered and joined to the table once, when something else needs it)."""

    def __init__(self) -> None:
        self.tables: dict[str, TableState] = {}
        self.appended: dict[str, list[DataFile]] = {}

    def add(self, event: Event) -> None:
        if not isinstance(event, TABLE_EVENTS):
            return
        name = event.table
        table = self.tables.get(name)
        if type(event) is RowsAppended and table is not None:
            # What the RowsAppended handler does, but for the files.
            self.appended.setdefault(name, []).extend(event.files)
            self.tables[name] = msgspec.structs.replace(
                table,
                version=event.version,
                updated_at=event.time,
                updated_by=event.actor,
                last_event_id=event.id,
            )
            return
        table = self._settled(name)
        updated = apply_table(event, table)
        if updated is None:
            self.tables.pop(name, None)
        else:
            self.tables[name] = updated

    def _settled(self, name: str) -> TableState | None:
        table = self.tables.get(name)
        files = self.appended.pop(name, None)
        if table is not None and files:
            table = self.tables[name] = msgspec.structs.replace(
                table, files=table.files + tuple(files)
            )
        return table

    def result(self) -> dict[str, TableState]:
        for name in list(self.appended):
            self._settled(name)
        return self.tables


def fold_super(state: SuperState, events: list[Event]) -> SuperState:
    """Fold many events."""
    for event in events:
        state = apply_super(state, event)
    return state


def apply_table(event: Event, table: TableState | None) -> TableState | None:
    """Fold one event of a table into that table's state (None before it exists and
    after it is dropped)."""
    if isinstance(event, TableDropped):
        return None
    return _apply_table(event, table)


@singledispatch
def _apply_table(event: EventBase, table: TableState | None) -> TableState:
    raise TypeError(f"no table handler for {type(event).__name__}")


def _touch(table: TableState, event: EventBase, **changes: Any) -> TableState:
    return msgspec.structs.replace(
        table,
        version=event.version,
        updated_at=event.time,
        updated_by=event.actor,
        last_event_id=event.id,
        **changes,
    )


@_apply_table.register
def _(event: TableCreated, table: TableState | None) -> TableState:
    return TableState(
        name=event.table,
        columns=event.columns,
        version=event.version,
        files=(),
        created_at=event.time,
        updated_at=event.time,
        created_by=event.actor,
        updated_by=event.actor,
        last_event_id=event.id,
        incarnation=event.id,
        created_version=event.version,
        mirrors=event.mirrors,
    )


def _require(table: TableState | None, event: EventBase) -> TableState:
    if table is None:
        raise ValueError(f"event {event.id} changes table {event.table!r} before it exists")
    return table


@_apply_table.register
def _(event: SchemaEvolved, table: TableState | None) -> TableState:
    return _touch(_require(table, event), event, columns=event.columns)


@_apply_table.register
def _(event: RowsAppended, table: TableState | None) -> TableState:
    current = _require(table, event)
    return _touch(current, event, files=current.files + event.files)


def _replace_files(
    current: TableState,
    removed_files: tuple[str, ...],
    added: tuple[DataFile, ...],
    deletes: tuple[FileDeletes, ...] = (),
    version: int = 0,
) -> tuple[DataFile, ...]:
    """The files after an event: ``deletes`` join their files' deletion vectors (which
    then carry ``version``), ``removed_files`` go, ``added`` come last."""
    removed = set(removed_files)
    by_path = {d.path: d for d in deletes}
    kept = []
    for f in current.files:
        if f.path in removed:
            continue
        more = by_path.get(f.path)
        if more is not None:
            f = msgspec.structs.replace(f, deleted=_more_deleted(f.deleted, more, version))
        kept.append(f)
    return tuple(kept) + added


def _more_deleted(
    deleted: DeletionVector | None, more: FileDeletes, version: int
) -> DeletionVector:
    if deleted is None:
        return DeletionVector(version, more.count, more.positions)
    count, positions = merge_positions(deleted.positions, more.positions)
    return DeletionVector(version, count, positions)


@_apply_table.register
def _(event: TableOverwritten, table: TableState | None) -> TableState:
    current = _require(table, event)
    return _touch(current, event, files=_replace_files(current, event.removed_files, event.files))


@_apply_table.register
def _(event: FilesReplaced, table: TableState | None) -> TableState:
    # RowsUpserted, RowsDeleted, TableCompacted (TableRestored has its own handler).
    current = _require(table, event)
    files = _replace_files(current, event.removed_files, event.files, event.deletes, event.version)
    return _touch(current, event, files=files)


@_apply_table.register
def _(event: TableRestored, table: TableState | None) -> TableState:
    current = _require(table, event)
    files = _replace_files(current, event.removed_files, event.files)
    return _touch(current, event, files=files, columns=event.columns)


@_apply_table.register
def _(event: VersionsExpired, table: TableState | None) -> TableState:
    current = _require(table, event)
    return _touch(current, event, retained_from=max(current.retained_from, event.before))


@_apply_table.register
def _(event: PoliciesSet, table: TableState | None) -> TableState:
    return _touch(_require(table, event), event, policies=event.policies)


@_apply_table.register
def _(event: MirrorsChanged, table: TableState | None) -> TableState:
    return _touch(_require(table, event), event, mirrors=event.formats)


def apply_registry(state: RegistryState, event: Event) -> RegistryState:
    """Fold one registry event into ``state``."""
    orgs = state.orgs
    if isinstance(event, OrgCreated) and event.org not in orgs:
        info = OrgInfo(name=event.org, created_at=event.time, created_by=event.actor)
        orgs = {**orgs, event.org: info}
    elif isinstance(event, SuperCreated) and event.org in orgs:
        org = orgs[event.org]
        sup = SuperInfo(name=event.super_, created_at=event.time, created_by=event.actor)
        org = msgspec.structs.replace(org, supers={**org.supers, event.super_: sup})
        orgs = {**orgs, event.org: org}
    return msgspec.structs.replace(state, orgs=orgs, position=event.id)


def fold_registry(state: RegistryState, events: list[Event]) -> RegistryState:
    for event in events:
        state = apply_registry(state, event)
    return state
