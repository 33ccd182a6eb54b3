"""The catalog: orgs, supers, tables, versions and history as the caller may see them
(what its policies withhold is decided by ``app.access.visibility``); dropping a table
and choosing its mirror formats.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from app.access.audit import check_cursor, history_fields, scan_super
from app.access.visibility import SuperVisibility, visibility
from app.api.guards import caller_of, visible
from app.api.routes.params import (
    IdempotencyKey,
    IfMatch,
    SuperName,
    body_fingerprint,
    change_target,
    error_responses,
)
from app.api.schemas import (
    DropResponse,
    History,
    HistoryEntry,
    MirrorsRequest,
    MirrorsResponse,
    OrgList,
    OrgOut,
    SuperList,
    SuperMeta,
    SuperOut,
    TableDetail,
    TableList,
    TableSummary,
    VersionDetail,
    table_detail,
    table_summary,
    version_detail,
)
from app.services import Services
from app.settings import MIRROR_FORMATS
from events.errors import InvalidInput, NotFound
from projections.catalog import SuperState


@get("/v1/orgs")
async def list_orgs(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> OrgList:
    """The orgs the caller can see."""
    caller = caller_of(request)
    registry = await services.reader.registry()
    orgs = [
        OrgOut(o.name, len([s for s in o.supers if caller.sees(o.name, s)]), o.created_at)
        for o in registry.orgs.values()
        if caller.sees(o.name)
    ]
    return OrgList(sorted(orgs, key=lambda o: o.name))


@get("/v1/{org:str}/supers", opt={"perm": "see"})
async def list_supers(
    request: Request[Any, Any, Any], services: NamedDependency[Services], org: FromPath[str]
) -> SuperList:
    """The supers of the org the caller can see."""
    caller = caller_of(request)
    registry = await services.reader.registry()
    info = registry.orgs.get(org)
    if info is None:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    supers = []
    for sup in sorted(info.supers.values(), key=lambda s: s.name):
        if not caller.sees(org, sup.name):
            continue
        state = visible(caller, await services.reader.super_state(org, sup.name))
        supers.append(SuperOut(sup.name, len(state.tables), sup.created_at))
    return SuperList(org, supers)


@get("/v1/{org:str}/{super:str}/meta", opt={"perm": "see"})
async def super_meta(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
) -> SuperMeta:
    """The super at a glance: when and by whom it was created, and the tables the
    caller can see with their totals."""
    registry = await services.reader.registry()
    info = registry.orgs.get(org)
    sup = info.supers.get(super_name) if info is not None else None
    if sup is None:
        raise NotFound(f"super {org}/{super_name} does not exist", code="super_not_found")
    caller = caller_of(request)
    state = visible(caller, await services.reader.require_super(org, super_name))
    tables, reason = _summaries(SuperVisibility(caller, state), state)
    meta = SuperMeta(
        org=org,
        name=super_name,
        created_at=sup.created_at,
        created_by=sup.created_by,
        table_count=len(tables),
        row_count=_total(t.row_count for t in tables),
        file_count=_total(t.file_count for t in tables),
        size_bytes=_total(t.size_bytes for t in tables),
        updated_at=max((t.updated_at for t in tables), default=None),
        tables=tables,
    )
    if reason is None:
        return meta
    # A total over a table whose figures are withheld would give them away.
    totals = [k for k in ("row_count", "file_count", "size_bytes") if getattr(meta, k) is None]
    return msgspec.structs.replace(meta, withheld=totals, withheld_reason=reason)


def _summaries(seen: SuperVisibility, state: SuperState) -> tuple[list[TableSummary], str | None]:
    """The tables of ``state`` as the caller may see them, by name, and why figures
    are withheld (None: nothing is)."""
    tables, reason = [], None
    for t in sorted(state.tables.values(), key=lambda t: t.name):
        shown = seen.table(t)
        tables.append(shown.apply(table_summary(t)))
        if shown.filtered:
            reason = shown.reason
    return tables, reason


def _total(values: Iterable[int | None]) -> int | None:
    """The sum, or None if a value is withheld."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


@get("/v1/{org:str}/{super:str}/tables", opt={"perm": "see"})
async def list_tables(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
) -> TableList:
    """The tables of the super the caller can see."""
    caller = caller_of(request)
    state = visible(caller, await services.reader.require_super(org, super_name))
    tables, reason = _summaries(SuperVisibility(caller, state), state)
    if reason is None:
        return TableList(org, super_name, tables)
    return TableList(org, super_name, tables, withheld_reason=reason)


@get(
    "/v1/{org:str}/{super:str}/tables/{table:str}",
    responses=error_responses(401, 404),
    opt={"perm": "read"},
)
async def describe_table(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
) -> Response[TableDetail]:
    found = await services.reader.require_table(org, super_name, table)
    mirrors = await services.table_mirrors(org, super_name, found)
    shown = visibility(caller_of(request), org, super_name, found)
    detail = shown.apply(table_detail(org, super_name, found, mirrors))
    # The version is the entity tag: send it back as If-Match to write conditionally.
    return Response(detail, headers={"ETag": f'"{found.version}"'})


@get(
    "/v1/{org:str}/{super:str}/tables/{table:str}/versions/{version:int}",
    responses=error_responses(401, 404, 410),
    opt={"perm": "read"},
)
async def describe_version(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    version: FromPath[int],
) -> VersionDetail:
    """One version's schema and files (410 once it has expired), under the table's
    current policies."""
    current = await services.reader.require_table(org, super_name, table)
    state = await services.reader.table_at(org, super_name, table, version=version)
    return visibility(caller_of(request), org, super_name, current).apply(version_detail(state))


@get("/v1/{org:str}/{super:str}/tables/{table:str}/history", opt={"perm": "read"})
async def table_history(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    after: Annotated[str, QueryParameter(description="event id cursor")] = "0-0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> History:
    """One entry per version, oldest first, paged with ``after`` = ``next_after``."""
    state = await services.reader.require_super(org, super_name)
    if table not in state.tables:
        raise NotFound(f"table {org}/{super_name}/{table} does not exist", code="table_not_found")
    seen = SuperVisibility(caller_of(request), state)
    events, cursor = await scan_super(
        services.log, org, super_name, after=check_cursor(after), limit=limit, table=table
    )
    entries, reasons = [], set()
    for e in events:
        added, removed, columns = history_fields(e)
        entry = HistoryEntry(
            version=e.version,
            event_type=type(e).__name__,
            event_id=e.id,
            actor=e.actor,
            time=e.time,
            request_id=e.request_id,
            rows_added=added,
            rows_removed=removed,
            columns_added=columns,
        )
        shown = seen.of_event(e)
        entries.append(shown.apply(entry))
        if shown.bound:
            reasons.add(shown.reason)
    if not reasons:
        return History(table, entries, cursor)
    return History(table, entries, cursor, withheld_reason="; ".join(sorted(reasons)))


@delete(
    "/v1/{org:str}/{super:str}/tables/{table:str}",
    status_code=200,
    responses=error_responses(401, 404, 409, 503),
    opt={"perm": "write"},
)
async def drop_table(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[DropResponse]:
    """Drop the table. Its name becomes free (a new table of that name continues the
    name's version numbers, so no old version or ETag ever matches it), its files
    become garbage for ``ledgerlake gc`` and its mirrors are removed. Its events stay:
    ``/history`` and ``/v1/events`` still show them."""
    fingerprint = body_fingerprint(request.url.path, "drop")
    target = change_target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.drop(target)
    body = DropResponse(
        table, outcome.version, outcome.result["rows"], outcome.event_id, outcome.replayed
    )
    return Response(body)


@put(
    "/v1/{org:str}/{super:str}/tables/{table:str}/mirrors",
    status_code=200,
    responses=error_responses(400, 401, 404, 409, 503),
    opt={"perm": "write"},
)
async def set_mirrors(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    data: JSONBody[MirrorsRequest],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[MirrorsResponse]:
    """Choose which mirror formats publish the table: ``{"formats": ["delta",
    "iceberg"]}`` (or a subset, or ``[]``). Recorded as a ``MirrorsChanged`` event; a
    format turned off has its mirror removed."""
    unknown = sorted(set(data.formats) - set(MIRROR_FORMATS))
    if unknown:
        raise InvalidInput(
            f"unknown mirror format(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(MIRROR_FORMATS)}",
            code="invalid_mirror_format",
        )
    fingerprint = body_fingerprint(request.url.path, data)
    target = change_target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.set_mirrors(target, tuple(data.formats))
    body = MirrorsResponse(
        table, outcome.version, outcome.result["mirrors"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})
