"""What a caller may see of a table's metadata under its policies: the one place that
decides it, for every surface that shows a table's schema, counts, statistics, files or
history (table detail, versions, history, events, ``/meta``, the table lists; the MCP
tools read those through the API).

The rules, for a caller the table's policies bind (``policies.applied_policies``); a
caller none binds (a role with no policy, an org admin, a platform admin) sees it all,
but one that may not read a table with policies (a write-only role) sees it as under a
row filter, its schema whole:

- a column the policies hide is absent: from schemas, column lists, history and events;
- a masked column stays, flagged ``masked`` with its ``mask`` (``hash`` or ``null``);
- the stored statistics (per-column min/max and null counts) are withheld: they are
  over every row of every file, deleted rows, masked values and hidden columns included;
- with a row filter, every figure of the unfiltered rows is withheld too: row counts,
  file counts, byte sizes, file lists and the row counts of history and events (a
  query counts the rows the caller may see);
- events lose their files (per-file min/max), deletion vectors, deleted keys, delete
  filters and the policies themselves;
- the mirrors keep their status and lag but lose their locations and publish errors;
- an event of a table that no longer exists (dropped, or the name's earlier table
  before it was re-created) is shown whole only to callers no policy can bind: its
  policies are gone, so for anyone else it is treated as under a row filter that
  hides every column name.

What is withheld is null (or empty, for ``stats``) and named in the object's
``withheld`` list, with a ``withheld_reason`` where the wire struct has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec

from app.access.auth import Caller
from app.access.policies import HIDDEN, applied_policies, treatment
from events.model import Event, stream_id_tuple
from projections.catalog import SuperState, TableState

FILTERED_REASON = (
    "a row filter of your policies applies to this table: figures over all of its rows "
    "(row and file counts, sizes, files, statistics) are withheld; query the table to "
    "count what you may see"
)
MASKED_REASON = (
    "a policy of yours applies to this table: its stored statistics (over every row "
    "and column, hidden and masked ones included) are withheld; query the table for "
    "statistics of what you may see"
)
UNREAD_REASON = (
    "you may not read this table and it has row policies: figures over its rows (row "
    "and file counts, sizes, files, statistics) are withheld"
)
UNKNOWN_REASON = (
    "this table no longer exists and the policies it had are not known: its figures, "
    "files and column names are withheld"
)

# Wire fields of figures over the unfiltered rows (set to None under a row filter).
FILTERED_FIELDS = ("row_count", "file_count", "size_bytes", "inline_batches", "files",
                   "rows_added", "rows_removed")  # fmt: skip
# Event fields: values of rows and files (any binding policy), row counts (a row
# filter) and column names (filtered by the hidden columns).
EVENT_VALUE_KEYS = ("files", "removed_files", "deletes", "keys", "where", "policies")
EVENT_COUNT_KEYS = ("rows", "rows_removed", "inserted", "updated", "unchanged")
EVENT_COLUMN_KEYS = ("columns", "added", "promoted", "key", "newer_than")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=msgspec.Struct)
C = TypeVar("C", bound=_Named)


@dataclass(frozen=True)
class Visibility:
    """What one caller sees of one table: ``bound`` (a policy applies), ``filtered``
    (a row filter applies), the ``hidden`` columns and the ``masks`` of the others;
    ``unknown`` for a table whose policies are gone."""

    bound: bool = False
    filtered: bool = False
    hidden: frozenset[str] = frozenset()
    masks: Mapping[str, str] = field(default_factory=dict)
    unknown: bool = False
    unread: bool = False  # a caller that may not read the table (a write-only role)

    @property
    def reason(self) -> str:
        if self.unknown:
            return UNKNOWN_REASON
        if self.unread:
            return UNREAD_REASON
        return FILTERED_REASON if self.filtered else MASKED_REASON

    def shows(self, column: str) -> bool:
        return not self.unknown and column not in self.hidden

    def names(self, columns: Iterable[str]) -> list[str]:
        """``columns`` without the hidden ones."""
        return [c for c in columns if self.shows(c)]

    def columns(self, columns: Iterable[C]) -> list[C]:
        """Wire columns (``name``, ``masked``, ``mask``) as the caller may see them."""
        out = []
        for column in columns:
            if not self.shows(column.name):
                continue
            mask = self.masks.get(column.name)
            if mask is not None and isinstance(column, msgspec.Struct):
                column = msgspec.structs.replace(column, masked=True, mask=mask)
            out.append(column)
        return out

    def apply(self, obj: S) -> S:
        """A wire struct with what the caller may not see withheld, by field name:
        ``columns``/``columns_added`` keep what is shown, ``stats`` is emptied, the
        figures of ``FILTERED_FIELDS`` become None under a row filter, and
        ``withheld`` (and ``withheld_reason``, if the struct has it) say so when
        anything was."""
        if not self.bound:
            return obj
        values = msgspec.structs.asdict(obj)
        fields = set(values)
        changes: dict[str, Any] = {}
        withheld: list[str] = []
        if "columns" in fields:
            changes["columns"] = self.columns(values["columns"])
        if "columns_added" in fields:
            changes["columns_added"] = self.names(values["columns_added"])
        if "stats" in fields:
            changes["stats"] = {}
            withheld.append("stats")
        if any(m.location or m.metadata_location or m.error for m in values.get("mirrors") or []):
            # Where the mirrors are holds every row and column: a bound caller that can
            # reach the storage must not be pointed at it (the Iceberg REST catalog
            # lists no bound table either), and a publish error may name any column.
            changes["mirrors"] = [
                msgspec.structs.replace(m, location=None, metadata_location=None, error=None)
                for m in values["mirrors"]
            ]
            withheld.append("mirrors")
        if self.filtered:
            for name in FILTERED_FIELDS:
                if name in fields:
                    changes[name] = None
                    withheld.append(name)
        if withheld and "withheld" in fields:
            changes["withheld"] = withheld
        if withheld and "withheld_reason" in fields:
            changes["withheld_reason"] = self.reason
        return msgspec.structs.replace(obj, **changes)

    def event(self, data: dict[str, Any]) -> dict[str, Any]:
        """An event (as builtins) as the caller may see it; ``withheld`` names the
        keys taken out."""
        if not self.bound:
            return data
        drop = set(EVENT_VALUE_KEYS)
        if self.filtered:
            drop |= set(EVENT_COUNT_KEYS)
        if self.unknown:
            drop |= set(EVENT_COLUMN_KEYS)
        out = {k: v for k, v in data.items() if k not in drop}
        for key in EVENT_COLUMN_KEYS:
            value = out.get(key)
            if isinstance(value, str) and not self.shows(value):
                del out[key]
            elif isinstance(value, list | tuple):
                out[key] = [c for c in value if self.shows(_column_name(c))]
        withheld = sorted(set(data) - set(out))
        if withheld:
            out["withheld"] = withheld
        return out


def _column_name(column: Any) -> str:
    return str(column["name"] if isinstance(column, dict) else column)


FULL = Visibility()
UNKNOWN = Visibility(bound=True, filtered=True, unknown=True)
# Who may see a table but not read it (a write-only role) must not learn more of its
# rows than a reader its policies bind: as under a row filter (the schema stays, to
# write by).
UNREAD = Visibility(bound=True, filtered=True, unread=True)


def visibility(caller: Caller, org: str, super_: str, current: TableState) -> Visibility:
    """What ``caller`` sees of the table, under its current policies (which also
    cover its past versions)."""
    applied = applied_policies(caller, org, super_, current)
    if not applied:
        if current.policies and not (
            caller.admin
            or caller.can("grant", org, super_, current.name)
            or caller.can("read", org, super_, current.name)
        ):
            return UNREAD
        return FULL
    hidden, masks = set(), {}
    for column in current.columns:
        shown = treatment(applied, column.name)
        if shown == HIDDEN:
            hidden.add(column.name)
        elif shown is not None:
            masks[column.name] = shown
    # A policy without a filter lets its role read every row.
    filtered = all(p.row_filter is not None for p in applied)
    return Visibility(True, filtered, frozenset(hidden), masks)


class SuperVisibility:
    """The visibility of every table of a super, and of each of its events."""

    def __init__(self, caller: Caller, state: SuperState) -> None:
        self.caller, self.state = caller, state
        self._tables: dict[str, Visibility] = {}
        # Whether some policy could bind the caller on a table of the super.
        self._bindable = not caller.admin and not caller.can("grant", state.org, state.name)

    def table(self, table: TableState) -> Visibility:
        if not self._bindable:
            return FULL
        if table.name not in self._tables:
            found = visibility(self.caller, self.state.org, self.state.name, table)
            self._tables[table.name] = found
        return self._tables[table.name]

    def of_event(self, event: Event) -> Visibility:
        """Under the current policies of the event's table; ``UNKNOWN`` for an event
        of a table (incarnation) that no longer exists."""
        if not self._bindable or not event.table:
            return FULL
        current = self.state.tables.get(event.table)
        if current is None or _before(event.id, current.incarnation):
            return self._unknown(event.table)
        return self.table(current)

    def _unknown(self, table: str) -> Visibility:
        # No policy could bind a caller whose grant on the table lifts every policy.
        if self.caller.can("grant", self.state.org, self.state.name, table):
            return FULL
        return UNKNOWN


def _before(event_id: str, incarnation: str) -> bool:
    """Whether an event is older than the table's current incarnation."""
    return bool(incarnation) and stream_id_tuple(event_id) < stream_id_tuple(incarnation)
