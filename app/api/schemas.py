"""Wire schemas of the HTTP API (kept apart from stored events so each can evolve).

``withheld`` / ``withheld_reason`` (and a column's ``masked`` / ``mask``) appear only in
what a caller bound by row policies gets (``app/access/visibility.py``): the figures
named in ``withheld`` are null (or empty), and the reason says why.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from events.model import ColumnStats, Field
from mirrors.status import MirrorInfo
from projections.arrow import type_name
from projections.catalog import TableState


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class IngestResponse(msgspec.Struct):
    table: str
    version: int
    rows: int
    event_id: str
    mode: str
    replayed: bool


class UpsertResponse(msgspec.Struct):
    table: str
    version: int
    mode: str
    inserted: int
    updated: int
    unchanged: int
    rows_removed: int
    event_id: str | None
    replayed: bool


class DeleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of: ``keys`` (column -> values; several columns are zipped into
    composite keys) or ``where`` (a restricted SQL boolean expression)."""

    keys: dict[str, list[Any]] | None = None
    where: str | None = None


class DeleteResponse(msgspec.Struct):
    table: str
    version: int
    rows_removed: int
    event_id: str | None
    replayed: bool


class RestoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    version: int


class DropResponse(msgspec.Struct):
    table: str
    version: int
    rows: int
    event_id: str | None
    replayed: bool


class PolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    row_filter: str | None = None
    hidden: list[str] = []
    masks: dict[str, str] = {}


class PoliciesRequest(msgspec.Struct, forbid_unknown_fields=True):
    policies: list[PolicyIn]


class PoliciesResponse(msgspec.Struct):
    table: str
    version: int
    policies: list[dict[str, Any]]
    event_id: str | None
    replayed: bool


class MirrorsRequest(msgspec.Struct, forbid_unknown_fields=True):
    formats: list[str]


class MirrorsResponse(msgspec.Struct):
    table: str
    version: int
    mirrors: list[str]
    event_id: str | None
    replayed: bool


class RestoreResponse(msgspec.Struct):
    table: str
    version: int
    restored_version: int
    event_id: str | None
    replayed: bool


class CompactResponse(msgspec.Struct):
    table: str
    version: int
    files_removed: int
    files_added: int
    rows: int
    event_id: str | None


class FileOut(msgspec.Struct):
    """One data file: ``rows`` as written, ``deleted_rows`` of them deleted since (by
    deletion vector; compaction folds them in)."""

    path: str
    rows: int
    size_bytes: int
    inline: bool
    deleted_rows: int = 0


class VersionDetail(msgspec.Struct):
    table: str
    version: int
    columns: list[ColumnOut]
    row_count: int | None
    files: list[FileOut] | None
    committed_at: datetime
    committed_by: str
    event_id: str
    withheld: list[str] | UnsetType = UNSET
    withheld_reason: str | UnsetType = UNSET


class OrgOut(msgspec.Struct):
    name: str
    supers: int
    created_at: datetime


class OrgList(msgspec.Struct):
    orgs: list[OrgOut]


class SuperOut(msgspec.Struct):
    name: str
    tables: int
    created_at: datetime


class SuperList(msgspec.Struct):
    org: str
    supers: list[SuperOut]


class ColumnOut(msgspec.Struct):
    name: str
    type: str
    nullable: bool
    # Set for a column the caller's policies mask: its values read as ``mask``.
    masked: bool | UnsetType = UNSET
    mask: str | UnsetType = UNSET


class TableSummary(msgspec.Struct):
    name: str
    version: int
    row_count: int | None
    file_count: int | None
    size_bytes: int | None
    updated_at: datetime
    withheld: list[str] | UnsetType = UNSET


class TableList(msgspec.Struct):
    org: str
    super: str
    tables: list[TableSummary]
    withheld_reason: str | UnsetType = UNSET


class ColumnStatsOut(msgspec.Struct):
    null_count: int
    min: Any = None
    max: Any = None


class TableDetail(msgspec.Struct):
    org: str
    super: str
    name: str
    version: int
    columns: list[ColumnOut]
    row_count: int | None
    file_count: int | None
    size_bytes: int | None
    stats: dict[str, ColumnStatsOut]
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str
    retained_from: int
    inline_batches: int | None
    mirrors: list[MirrorInfo] = []
    withheld: list[str] | UnsetType = UNSET
    withheld_reason: str | UnsetType = UNSET


class HistoryEntry(msgspec.Struct):
    version: int
    event_type: str
    event_id: str
    actor: str
    time: datetime
    request_id: str
    rows_added: int | None
    rows_removed: int | None
    columns_added: list[str] = []
    withheld: list[str] | UnsetType = UNSET


class History(msgspec.Struct):
    table: str
    entries: list[HistoryEntry]
    next_after: str | None
    withheld_reason: str | UnsetType = UNSET


class QueryRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``as_of_version`` (the query must name one table) or ``as_of_time`` (an ISO
    8601 instant; every table as it was then) query past versions."""

    sql: str
    limit: int | None = None
    timeout_s: float | None = None
    as_of_version: int | None = None
    as_of_time: str | None = None
    # Rows to skip first (paging: the same query and snapshot with a growing offset).
    offset: int = 0


class QueryPlanOut(msgspec.Struct):
    """A query checked, bound and planned without running: the columns it would
    return, the tables it reads and DuckDB's physical plan."""

    valid: bool
    columns: list[QueryColumn]
    tables: list[str]
    plan: str


class SuperMeta(msgspec.Struct):
    """A super at a glance: its tables (those the caller can see) and their totals."""

    org: str
    name: str
    created_at: datetime
    created_by: str
    table_count: int
    row_count: int | None
    file_count: int | None
    size_bytes: int | None
    updated_at: datetime | None
    tables: list[TableSummary]
    withheld: list[str] | UnsetType = UNSET
    withheld_reason: str | UnsetType = UNSET


class ServiceInfo(msgspec.Struct):
    """What a client may rely on: the version, the query limits and the formats."""

    name: str
    version: str
    query: dict[str, Any]
    ingest: dict[str, Any]
    mirrors: list[str]
    mcp: dict[str, Any]


class QueryColumn(msgspec.Struct):
    name: str
    type: str


class QueryResponse(msgspec.Struct):
    columns: list[QueryColumn]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    elapsed_ms: float


class EventPage(msgspec.Struct):
    events: list[dict[str, Any]]
    next_after: str | None
    withheld_reason: str | UnsetType = UNSET


def columns_out(columns: tuple[Field, ...]) -> list[ColumnOut]:
    return [ColumnOut(f.name, type_name(f.type), f.nullable) for f in columns]


def stats_out(stats: dict[str, ColumnStats]) -> dict[str, ColumnStatsOut]:
    return {k: ColumnStatsOut(v.null_count, v.min, v.max) for k, v in stats.items()}


def table_summary(t: TableState) -> TableSummary:
    return TableSummary(t.name, t.version, t.row_count, len(t.files), t.size_bytes, t.updated_at)


def table_detail(
    org: str, sup: str, t: TableState, mirrors: list[MirrorInfo] | None = None
) -> TableDetail:
    return TableDetail(
        org=org,
        super=sup,
        name=t.name,
        version=t.version,
        columns=columns_out(t.columns),
        row_count=t.row_count,
        file_count=len(t.files),
        size_bytes=t.size_bytes,
        stats=stats_out(t.column_stats()),
        created_at=t.created_at,
        created_by=t.created_by,
        updated_at=t.updated_at,
        updated_by=t.updated_by,
        retained_from=t.retained_from,
        inline_batches=len(t.inline_files),
        mirrors=mirrors or [],
    )


def version_detail(t: TableState) -> VersionDetail:
    return VersionDetail(
        table=t.name,
        version=t.version,
        columns=columns_out(t.columns),
        row_count=t.row_count,
        files=[
            FileOut(f.path, f.rows, f.size_bytes, f.is_inline, f.rows - f.live_rows)
            for f in t.files
        ],
        committed_at=t.updated_at,
        committed_by=t.updated_by,
        event_id=t.last_event_id,
    )


# Principals, tokens, grants and roles (app/api/routes/principals.py).
class PrincipalIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    org: str | None = None
    kind: str = "user"
    attributes: dict[str, str] = {}
    admin: bool = False
    external_id: str | None = None


class PrincipalPatch(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    attributes: dict[str, str] | None = None
    disabled: bool | None = None


class PrincipalOut(msgspec.Struct):
    id: str
    name: str
    kind: str
    org: str | None
    attributes: dict[str, str]
    admin: bool
    disabled: bool
    created_at: datetime
    created_by: str
    external_id: str | None = None


class TokenIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    expires_in_s: float | None = None


class TokenOut(msgspec.Struct):
    id: str
    principal_id: str
    name: str
    expires_at: datetime | None
    token: str | None = None


class GrantIn(msgspec.Struct, forbid_unknown_fields=True):
    principal_id: str
    role: str
    org: str
    super: str | None = None
    table: str | None = None


class TokenInfo(msgspec.Struct):
    """A token as listed: never its secret."""

    id: str
    principal_id: str
    name: str
    expires_at: datetime | None
    revoked: bool
    created_at: datetime


class GrantOut(msgspec.Struct):
    id: str
    principal_id: str
    role: str
    org: str
    super: str | None
    table: str | None


class WhoAmI(msgspec.Struct):
    """The caller: its principal, the token it used and its grants."""

    principal: PrincipalOut
    token_id: str | None
    grants: list[GrantOut]


class RoleIn(msgspec.Struct, forbid_unknown_fields=True):
    org: str
    permissions: list[str]
