"""HTTP route handlers. They parse and authorize; the services do the work."""

from __future__ import annotations

import hashlib
import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from litestar import Request, Response, Router, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, PathParameter, QueryParameter

from app.access.audit import (
    ReadRecord,
    audit_entries,
    check_cursor,
    history_fields,
    record_read,
    scan_org,
    scan_super,
)
from app.access.auth import Caller, Forbidden
from app.access.policies import binds, hidden_columns, restrict
from app.api.routes.principals import ADMIN_HANDLERS
from app.api.schemas import (
    CompactResponse,
    DeleteRequest,
    DeleteResponse,
    DropResponse,
    ErrorResponse,
    EventPage,
    History,
    HistoryEntry,
    IngestResponse,
    MirrorsRequest,
    MirrorsResponse,
    OrgList,
    OrgOut,
    PoliciesRequest,
    PoliciesResponse,
    QueryColumn,
    QueryPlanOut,
    QueryRequest,
    QueryResponse,
    RestoreRequest,
    RestoreResponse,
    ServiceInfo,
    SuperList,
    SuperMeta,
    SuperOut,
    TableDetail,
    TableList,
    UpsertResponse,
    VersionDetail,
    table_detail,
    table_summary,
    version_detail,
)
from app.services import Services
from app.settings import MIRROR_FORMATS, package_version
from app.write.append import IngestRequest, check_name
from app.write.bodies import format_for_content_type, open_source
from app.write.changes.mutator import Outcome, Target
from events.errors import InvalidInput, LedgerError, NotFound, PayloadTooLarge
from events.model import Policy, now, to_builtins
from events.redis_log import guarded
from projections.arrow import from_arrow, normalize_type, type_name
from projections.catalog import SuperState
from projections.query.engine import Analysis, Resolver, Restricted, ViewSource, parse_time

ARROW_STREAM = "application/vnd.apache.arrow.stream"
SuperName = Annotated[str, PathParameter(name="super", description="the super table (catalog)")]


# Error responses, for the OpenAPI document (the body is always ErrorResponse).
def _errors(*codes: int) -> dict[int, ResponseSpec]:
    described = {
        400: "bad input or a refused query", 401: "missing or wrong bearer token",
        403: "visible but not allowed to the caller",
        404: "unknown (or not granted) org, super or table",
        408: "the query ran past its timeout",
        409: "If-Match is stale, or the table kept changing (details.current_version)",
        410: "that table version has expired", 413: "body larger than the limit",
        415: "unsupported Content-Type", 422: "type mismatch, or a reused Idempotency-Key",
        429: "over the caller's rate limit; see Retry-After",
        503: "Redis or storage unreachable; retry",
    }  # fmt: skip
    return {c: ResponseSpec(ErrorResponse, description=described[c]) for c in codes}


# Query results carry decimals (e.g. sum() over integers) as JSON numbers, not strings.
_RESULT_ENCODER = msgspec.json.Encoder(decimal_format="number")


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def actor_for(request: Request[Any, Any, Any]) -> str:
    """The principal and token id of the request, as events record them."""
    caller: Caller | None = getattr(request.state, "caller", None)
    return caller.actor if caller is not None else "anonymous"


def request_id(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


async def require_token(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Every /v1 and /iceberg request needs ``Authorization: Bearer <token>``. The
    caller is kept on the connection; a handler's ``opt["perm"]`` (``see``, ``read``,
    ``write``, ``grant``) is checked against the org / super / table in its path: 404
    for what the caller cannot see, 403 for what it cannot do."""
    services: Services = connection.app.state.services
    caller = await services.auth.authenticate(
        connection.headers.get("authorization", ""), services.settings.api_token
    )
    connection.state.caller = caller
    await services.auth.limit(caller, services.settings.rate_limit_per_s)
    perm = handler.opt.get("perm")
    org = connection.path_params.get("org")
    if perm and org:
        sup = connection.path_params.get("super", "")
        table = connection.path_params.get("table", "")
        if perm == "see":
            caller.require_visible(org, sup, table)
        else:
            caller.require(perm, org, sup, table)


def visible(caller: Caller, state: SuperState) -> SuperState:
    """``state`` with only the tables the caller can see (the views a query gets)."""
    if caller.admin:
        return state
    tables = {
        name: t for name, t in state.tables.items() if caller.sees(state.org, state.name, name)
    }
    return msgspec.structs.replace(state, tables=tables)


# Event fields that carry row values (file statistics, deleted keys, filters).
REDACTED_EVENT_FIELDS = frozenset({"files", "keys", "where", "removed_files", "policies"})


def readable(caller: Caller, state: SuperState) -> SuperState:
    """``state`` with only the tables the caller may read (what a query can name; a
    custom role may see a table without reading it)."""
    if caller.admin:
        return state
    tables = {
        name: t
        for name, t in state.tables.items()
        if caller.can("read", state.org, state.name, name)
    }
    return msgspec.structs.replace(state, tables=tables)


def caller_of(request: Request[Any, Any, Any]) -> Caller:
    caller: Caller = request.state.caller
    return caller


@get("/health")
async def health(services: NamedDependency[Services]) -> Response[dict[str, Any]]:
    """Redis reachability and projection lag. 503 when Redis cannot be reached."""
    started = time.perf_counter()
    try:
        await guarded(services.redis.ping())
        latency = (time.perf_counter() - started) * 1000
        lags = await services.all_lags()
    except LedgerError as exc:
        body = {"status": "degraded", "redis": {"ok": False, "error": exc.message}}
        return Response(body, status_code=503)
    body = {
        "status": "ok",
        "redis": {"ok": True, "latency_ms": round(latency, 2)},
        "projections": lags,
    }
    return Response(body, status_code=200)


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(services: NamedDependency[Services]) -> Response[str]:
    """Prometheus metrics: the lag of each projection (the catalog and each mirror
    format), in events and seconds. 503 when Redis cannot be reached."""
    try:
        lags = await services.all_lags()
    except LedgerError as exc:
        return Response(f"# redis unreachable: {exc.message}\n", status_code=503)
    lines = [
        "# HELP ledgerlake_projection_lag_events Events not yet applied by the projection.",
        "# TYPE ledgerlake_projection_lag_events gauge",
    ]
    lines += [
        f'ledgerlake_projection_lag_events{{projection="{name}"}} {lag["lag_events"]}'
        for name, lag in lags.items()
    ]
    lines += [
        "# HELP ledgerlake_projection_lag_seconds Age of the oldest event not yet applied.",
        "# TYPE ledgerlake_projection_lag_seconds gauge",
    ]
    lines += [
        f'ledgerlake_projection_lag_seconds{{projection="{name}"}} {lag["lag_seconds"]}'
        for name, lag in lags.items()
    ]
    lines += [
        "# HELP ledgerlake_mirror_failed_tables Tables whose last mirror publish failed.",
        "# TYPE ledgerlake_mirror_failed_tables gauge",
    ]
    lines += [
        f'ledgerlake_mirror_failed_tables{{projection="{name}"}} {lag["failed_tables"]}'
        for name, lag in lags.items()
        if "failed_tables" in lag
    ]
    return Response("\n".join(lines) + "\n")


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(
            f"If-Match must be a table version number, not {value!r}", code="invalid_if_match"
        ) from None


# A body is written to its staging file in blocks of this size, each in one worker
# thread call (chunk by chunk, the thread hops were a third of a 5 MB ingest); a body
# that fits in one small block is written at once, on the event loop.
STAGE_BLOCK = 8 * 1024 * 1024
STAGE_INLINE = 256 * 1024


async def _stage_body(
    request: Request[Any, Any, Any], staged: Path, digest: Any, limit: int
) -> int:
    """Stream the request body into ``staged`` (and ``digest``); its size."""
    size, buffered = 0, 0
    pending: list[bytes] = []

    def flush(blocks: list[bytes], mode: str) -> None:
        with open(staged, mode) as fh:
            fh.writelines(blocks)

    mode = "wb"
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        digest.update(chunk)
        pending.append(chunk)
        buffered += len(chunk)
        if buffered >= STAGE_BLOCK:
            await anyio.to_thread.run_sync(flush, pending, mode)
            pending, buffered, mode = [], 0, "ab"
    if buffered <= STAGE_INLINE and mode == "wb":
        flush(pending, mode)
    else:
        await anyio.to_thread.run_sync(flush, pending, mode)
    return size


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/rows",
    status_code=200,
    responses=_errors(400, 401, 404, 409, 413, 415, 422, 503),
    opt={"perm": "write"},
)
async def ingest_rows(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    mode: Annotated[str, QueryParameter(description="append, overwrite or upsert")] = "append",
    key: Annotated[
        str | None, QueryParameter(description="upsert: the key columns, comma-separated")
    ] = None,
    newer_than: Annotated[
        str | None,
        QueryParameter(description="upsert: apply a row only if this column is greater"),
    ] = None,
    if_match: Annotated[
        str | None,
        HeaderParameter(name="If-Match", description="expected table version (-1: new)"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(name="Idempotency-Key", description="retries return the first result"),
    ] = None,
) -> Response[IngestResponse | UpsertResponse]:
    """Append rows, replace the table (``mode=overwrite``) or merge by key
    (``mode=upsert&key=id``). The body format follows Content-Type: JSON array, NDJSON,
    CSV, Parquet or Arrow IPC stream."""
    for kind, name in (("org", org), ("super", super_name), ("table", table)):
        check_name(kind, name)
    if mode == "upsert" and not key:
        raise InvalidInput("mode=upsert needs key=<column>[,<column>...]", code="invalid_key")
    if mode != "upsert" and (key or newer_than):
        raise InvalidInput("key and newer_than apply to mode=upsert only", code="invalid_mode")
    fmt = format_for_content_type(request.headers.get("content-type"))
    expected_version = _parse_if_match(if_match)
    limit = services.settings.max_body_bytes
    staged = services.storage.staging_file(".body")
    digest = hashlib.sha256(f"{org}/{super_name}/{table}|{mode}|{key}|{newer_than}|{fmt}|".encode())
    try:
        size = await _stage_body(request, staged, digest, limit)
        if size == 0:
            raise InvalidInput("the request body is empty", code="empty_body")
        if mode == "upsert":
            assert key is not None
            target = Target(
                org,
                super_name,
                table,
                actor=actor_for(request),
                request_id=request_id(request),
                if_match=expected_version,
                idempotency_key=idempotency_key,
                fingerprint=digest.hexdigest(),
            )
            outcome = await _upsert(services, target, staged, fmt, key.split(","), newer_than)
            return Response(
                UpsertResponse(
                    table=table,
                    version=outcome.version,
                    mode="upsert",
                    inserted=outcome.result["inserted"],
                    updated=outcome.result["updated"],
                    unchanged=outcome.result["unchanged"],
                    rows_removed=outcome.result["rows_removed"],
                    event_id=outcome.event_id,
                    replayed=outcome.replayed,
                ),
                headers={"ETag": f'"{outcome.version}"'},
            )
        result = await services.writer.ingest(
            IngestRequest(
                org=org,
                super_=super_name,
                table=table,
                source=staged,
                fmt=fmt,
                mode=mode,
                if_match=expected_version,
                idempotency_key=idempotency_key,
                fingerprint=digest.hexdigest(),
                actor=actor_for(request),
                request_id=request_id(request),
            )
        )
    finally:
        staged.unlink(missing_ok=True)
    body = IngestResponse(
        result.table, result.version, result.rows, result.event_id, result.mode, result.replayed
    )
    return Response(body, headers={"ETag": f'"{result.version}"'})


async def _upsert(
    services: Services,
    target: Target,
    staged: Any,
    fmt: str,
    key: list[str],
    newer_than: str | None,
) -> Outcome:
    state = await services.reader.super_state(target.org, target.super_)
    current = state.tables.get(target.table)
    known = {f.name: f.type for f in current.columns} if current else {}
    source = await anyio.to_thread.run_sync(open_source, staged, fmt, known)
    return await services.mutator.upsert(target, source, key, newer_than)


def _target(
    request: Request[Any, Any, Any],
    org: str,
    super_name: str,
    table: str,
    if_match: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> Target:
    for kind, name in (("org", org), ("super", super_name), ("table", table)):
        check_name(kind, name)
    return Target(
        org,
        super_name,
        table,
        actor=actor_for(request),
        request_id=request_id(request),
        if_match=_parse_if_match(if_match),
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )


IfMatch = Annotated[
    str | None, HeaderParameter(name="If-Match", description="expected table version")
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", description="retries return the first result"),
]


def _fingerprint(path: str, body: Any) -> str:
    return hashlib.sha256(path.encode() + b"|" + msgspec.json.encode(body)).hexdigest()


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/delete",
    status_code=200,
    responses=_errors(400, 401, 404, 409, 422, 503),
    opt={"perm": "write"},
)
async def delete_rows(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    data: JSONBody[DeleteRequest],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[DeleteResponse]:
    """Delete rows by key list (``{"keys": {"id": [1, 2]}}``) or by a restricted SQL
    boolean expression (``{"where": "region = 'eu' and amount < 0"}``). Files holding
    such rows are rewritten without them (copy-on-write)."""
    fingerprint = _fingerprint(request.url.path, data)
    target = _target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.delete(target, keys=data.keys, where=data.where)
    body = DeleteResponse(
        table, outcome.version, outcome.result["rows_removed"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/restore",
    status_code=200,
    responses=_errors(400, 401, 404, 409, 410, 503),
    opt={"perm": "write"},
)
async def restore_table(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    data: JSONBody[RestoreRequest],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[RestoreResponse]:
    """Make version ``n`` (its schema and rows) current again, as a new version."""
    fingerprint = _fingerprint(request.url.path, data)
    target = _target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.restore(target, data.version)
    body = RestoreResponse(table, outcome.version, data.version, outcome.event_id, outcome.replayed)
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/compact",
    status_code=200,
    responses=_errors(400, 401, 404, 409, 503),
    opt={"perm": "write"},
)
async def compact_table(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
) -> CompactResponse:
    """Merge the table's small files and inlined batches (a no-op when there are none)."""
    target = _target(request, org, super_name, table, None, None, "")
    outcome = await services.mutator.compact(target)
    result = outcome.result
    return CompactResponse(
        table,
        outcome.version,
        result.get("files_removed", 0),
        result.get("files_added", 0),
        result.get("rows", 0),
        outcome.event_id,
    )


@get(
    "/v1/{org:str}/{super:str}/tables/{table:str}/versions/{version:int}",
    responses=_errors(401, 404, 410),
    opt={"perm": "read"},
)
async def describe_version(
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    version: FromPath[int],
) -> VersionDetail:
    """One version's schema and files (410 once it has expired)."""
    state = await services.reader.table_at(org, super_name, table, version=version)
    return version_detail(state)


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
    state = visible(caller_of(request), await services.reader.require_super(org, super_name))
    tables = [table_summary(t) for t in sorted(state.tables.values(), key=lambda t: t.name)]
    return SuperMeta(
        org=org,
        name=super_name,
        created_at=sup.created_at,
        created_by=sup.created_by,
        table_count=len(tables),
        row_count=sum(t.row_count for t in tables),
        file_count=sum(t.file_count for t in tables),
        size_bytes=sum(t.size_bytes for t in tables),
        updated_at=max((t.updated_at for t in tables), default=None),
        tables=tables,
    )


@get("/v1/info")
async def service_info(services: NamedDependency[Services]) -> ServiceInfo:
    """The service's version and the limits a client (or an LLM through MCP) works
    within: query rows and timeouts, the largest ingest body, the mirror formats."""
    s = services.settings
    return ServiceInfo(
        name="ledgerlake",
        version=package_version(),
        query={
            "default_limit": s.query_default_limit,
            "max_limit": s.query_max_limit,
            "default_timeout_s": s.query_timeout_s,
            "max_timeout_s": s.query_max_timeout_s,
            "max_result_bytes": s.query_max_result_bytes,
            "max_sql_chars": s.query_max_sql_chars,
        },
        ingest={"max_body_bytes": s.max_body_bytes},
        mirrors=list(s.mirror_formats),
        mcp={
            "path": "/mcp",
            "token_budget": s.mcp_token_budget,
            "timeout_s": s.mcp_timeout_s,
            "max_concurrent_per_principal": s.mcp_max_concurrent_per_principal,
        },
    )


@get("/v1/{org:str}/{super:str}/tables", opt={"perm": "see"})
async def list_tables(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
) -> TableList:
    """The tables of the super the caller can see."""
    state = visible(caller_of(request), await services.reader.require_super(org, super_name))
    tables = [table_summary(t) for t in sorted(state.tables.values(), key=lambda t: t.name)]
    return TableList(org, super_name, tables)


@get(
    "/v1/{org:str}/{super:str}/tables/{table:str}",
    responses=_errors(401, 404),
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
    detail = table_detail(org, super_name, found, mirrors)
    caller = caller_of(request)
    if binds(caller, org, super_name, found):
        # Row filters or masks apply to the caller: no min/max of what they hide, and
        # no hidden column (its name would only lead to a query that cannot name it).
        hidden = hidden_columns(caller, org, super_name, found)
        columns = [c for c in detail.columns if c.name not in hidden]
        detail = msgspec.structs.replace(detail, stats={}, columns=columns)
    # The version is the entity tag: send it back as If-Match to write conditionally.
    return Response(detail, headers={"ETag": f'"{found.version}"'})


@delete(
    "/v1/{org:str}/{super:str}/tables/{table:str}",
    status_code=200,
    responses=_errors(401, 404, 409, 503),
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
    fingerprint = _fingerprint(request.url.path, "drop")
    target = _target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.drop(target)
    body = DropResponse(
        table, outcome.version, outcome.result["rows"], outcome.event_id, outcome.replayed
    )
    return Response(body)


@put(
    "/v1/{org:str}/{super:str}/tables/{table:str}/mirrors",
    status_code=200,
    responses=_errors(400, 401, 404, 409, 503),
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
    fingerprint = _fingerprint(request.url.path, data)
    target = _target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.set_mirrors(target, tuple(data.formats))
    body = MirrorsResponse(
        table, outcome.version, outcome.result["mirrors"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


@put(
    "/v1/{org:str}/{super:str}/tables/{table:str}/policies",
    status_code=200,
    responses=_errors(400, 401, 403, 404, 409, 503),
    opt={"perm": "grant"},
)
async def set_policies(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    data: JSONBody[PoliciesRequest],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[PoliciesResponse]:
    """Replace the table's row-level security and column masking: per role, a
    ``row_filter`` (restricted SQL; ``:principal.<attr>`` is the querying principal's
    attribute), ``hidden`` columns and ``masks`` (``null`` or ``hash``). Recorded as a
    ``PoliciesSet`` event. Needs ``org_admin``."""
    policies = tuple(
        Policy(p.role, p.row_filter, tuple(p.hidden), dict(p.masks)) for p in data.policies
    )
    fingerprint = _fingerprint(request.url.path, data)
    target = _target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    custom = tuple((await services.auth.state()).roles.get(org, {}))
    outcome = await services.mutator.set_policies(target, policies, custom)
    body = PoliciesResponse(
        table, outcome.version, outcome.result["policies"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


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
    current = await services.reader.require_table(org, super_name, table)
    hidden = hidden_columns(caller_of(request), org, super_name, current)
    events, cursor = await scan_super(
        services.log, org, super_name, after=check_cursor(after), limit=limit, table=table
    )
    entries = []
    for e in events:
        added, removed, columns = history_fields(e)
        entries.append(
            HistoryEntry(
                version=e.version,
                event_type=type(e).__name__,
                event_id=e.id,
                actor=e.actor,
                time=e.time,
                request_id=e.request_id,
                rows_added=added,
                rows_removed=removed,
                columns_added=[c for c in columns if c not in hidden],
            )
        )
    return History(table, entries, cursor)


# DuckDB's infinite dates and timestamps, as stored in Arrow.
_INFINITIES = {2**63 - 1: "infinity", -(2**63) + 1: "-infinity",
               2**31 - 1: "infinity", -(2**31) + 1: "-infinity"}  # fmt: skip


def _json_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values for JSON; values Python cannot hold (``'infinity'::timestamp``,
    dates past year 9999) fall back to DuckDB/Arrow's text form for that column."""
    try:
        values: list[Any] = column.to_pylist()
        return values
    except (OverflowError, ValueError, pa.ArrowException):
        pass
    out: list[Any] = []
    for chunk in column.chunks:
        raw = pc.cast(
            chunk.view(pa.int64() if chunk.type.bit_width == 64 else pa.int32()), pa.int64()
        )
        for scalar, number in zip(chunk, raw.to_pylist(), strict=True):
            try:
                out.append(scalar.as_py())
            except (OverflowError, ValueError):
                out.append(_INFINITIES.get(number, f"<out of range: {number}>"))
    return out


def _result_columns(table: pa.Table) -> list[QueryColumn]:
    out = []
    for f in table.schema:
        try:
            name = type_name(from_arrow(normalize_type(f.type), f.name))
        except LedgerError:
            name = str(f.type)
        out.append(QueryColumn(f.name, name))
    return out


async def _query_views(
    caller: Caller, services: Services, org: str, super_name: str, data: QueryRequest
) -> tuple[Resolver, list[str], set[str]]:
    """The resolver a query of ``caller`` runs with, the list it fills with the tables
    the query reads (for the audit) and the set it fills with those a policy restricts.
    Only the tables the caller may read exist for the query: any other name is an
    unknown table to the engine, whatever form of SQL names it. Each view goes through
    the caller's policies."""
    state = readable(caller, await services.reader.require_super(org, super_name))
    resolve = services.views(
        org, super_name, state, as_of_version=data.as_of_version, as_of_time=data.as_of_time
    )
    touched: list[str] = []
    restricted: set[str] = set()

    async def recording(analysis: Analysis) -> dict[str, ViewSource]:
        touched.extend(sorted({r.name for r in analysis.refs if r.name in state.tables}))
        names = {r.view: r.name for r in analysis.refs}
        views = await resolve(analysis)
        out: dict[str, ViewSource] = {}
        for view, source in views.items():
            current = state.tables[names[view]]
            table = source.table if isinstance(source, Restricted) else source
            out[view] = restrict(caller, org, super_name, current, table)
            if isinstance(out[view], Restricted):
                restricted.add(names[view])
        return out

    return recording, touched, restricted


@post(
    "/v1/{org:str}/{super:str}/query/validate",
    status_code=200,
    responses=_errors(400, 401, 404, 410, 503),
    opt={"perm": "see"},
)
async def validate_query(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    data: JSONBody[QueryRequest],
) -> QueryPlanOut:
    """Check, bind and plan a query exactly as ``/query`` would (same rules, same
    tables, same policies), without running it: the columns it would return, the
    tables it reads and DuckDB's physical plan. An invalid query is the same 400
    that ``/query`` gives."""
    caller = caller_of(request)
    recording, _, restricted = await _query_views(caller, services, org, super_name, data)
    plan = await services.engine.plan(
        recording, data.sql, timeout_s=data.timeout_s, scope=f"{org}/{super_name}"
    )
    columns = _result_columns(plan.schema.empty_table())
    text = plan.plan
    if restricted:
        # The optimizer prunes with the files' min/max, taken over rows the policy
        # hides (a filter outside them plans as an empty result): no plan, then.
        text = f"(not shown: row policies apply to {', '.join(sorted(restricted))})"
    return QueryPlanOut(True, columns, sorted(plan.tables), text)


@post(
    "/v1/{org:str}/{super:str}/query",
    status_code=200,
    responses=_errors(400, 401, 404, 408, 410, 503),
    opt={"perm": "see"},
)
async def run_query(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    data: JSONBody[QueryRequest],
) -> Response[Any]:
    """Run one read-only SELECT over the super's tables (referenced by name).

    ``Accept: text/csv`` or ``application/vnd.apache.arrow.stream`` change the format."""
    caller = caller_of(request)
    recording, touched, _ = await _query_views(caller, services, org, super_name, data)
    started = time.perf_counter()

    async def audit(rows: int, error: str = "") -> None:
        record = ReadRecord(
            time=now(),
            principal=caller.principal.id,
            token=caller.token_id,
            org=org,
            super=super_name,
            sql=data.sql[:10_000],
            tables=touched,
            rows=rows,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            error=error,
            request_id=request_id(request),
        )
        await record_read(
            services.redis, services.keys, record, services.settings.audit_retention_s
        )

    try:
        result = await services.engine.run(
            recording,
            data.sql,
            limit=data.limit,
            timeout_s=data.timeout_s,
            offset=data.offset,
            scope=f"{org}/{super_name}",
        )
    except LedgerError as exc:
        await audit(0, exc.code)
        raise
    except BaseException:
        # The client went away (or an MCP call's deadline passed) mid-query: still
        # recorded, past the cancellation.
        with anyio.CancelScope(shield=True):
            await audit(0, "cancelled")
        raise
    await audit(result.table.num_rows)
    table = result.table
    accept = request.headers.get("accept", "")
    headers = {
        "X-Ledgerlake-Row-Count": str(table.num_rows),
        "X-Ledgerlake-Truncated": str(result.truncated).lower(),
    }
    if "text/csv" in accept:
        sink = io.BytesIO()
        try:
            pacsv.write_csv(table, sink)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InvalidInput(
                f"this result cannot be written as CSV ({exc}); ask for JSON or Arrow",
                code="format_unsupported",
            ) from exc
        return Response(sink.getvalue(), media_type="text/csv", headers=headers)
    if ARROW_STREAM in accept:
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return Response(sink.getvalue(), media_type=ARROW_STREAM, headers=headers)
    columns = [_json_values(c) for c in table.columns]
    rows = [list(r) for r in zip(*columns, strict=True)] if columns else []
    body = QueryResponse(
        columns=_result_columns(table),
        rows=rows,
        row_count=table.num_rows,
        truncated=result.truncated,
        elapsed_ms=round(result.elapsed_ms, 2),
    )
    return Response(_RESULT_ENCODER.encode(body), media_type="application/json", headers=headers)


@get("/v1/events")
async def list_events(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: Annotated[str, QueryParameter()],
    super_name: Annotated[str | None, QueryParameter(name="super")] = None,
    table: Annotated[str | None, QueryParameter()] = None,
    after: Annotated[str, QueryParameter(description="event id cursor")] = "0-0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> EventPage:
    """The audit log, straight from the streams, oldest first: the events of what the
    caller can read."""
    caller = caller_of(request)
    caller.require_visible(org)
    if super_name is not None:
        caller.require_visible(org, super_name, table or "")
    registry = await services.reader.registry()
    if org not in registry.orgs:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    cursor = check_cursor(after)
    if super_name is None:
        if table is not None:
            raise InvalidInput("'table' needs 'super'", code="invalid_filter")
        supers = sorted(registry.orgs[org].supers)
        events, nxt = await scan_org(services.log, org, supers, after=cursor, limit=limit)
    else:
        await services.reader.require_super(org, super_name)
        events, nxt = await scan_super(
            services.log, org, super_name, after=cursor, limit=limit, table=table
        )
    shown = [e for e in events if caller.can("read", org, e.super_, e.table)]
    # Tables whose policies bind the caller, per super (one catalog read per super).
    # (and the columns they hide)
    bound: dict[str, dict[str, set[str]]] = {}
    if not caller.admin:
        for sup in {e.super_ for e in shown if e.table}:
            tables = (await services.reader.super_state(org, sup)).tables.values()
            bound[sup] = {
                t.name: hidden_columns(caller, org, sup, t)
                for t in tables
                if binds(caller, org, sup, t)
            }
    out = []
    for event in shown:
        data = to_builtins(event)
        hidden = bound.get(event.super_, {}).get(event.table)
        if hidden is not None:
            # Row filters or masks apply: no per-file min/max, deleted keys, filters or
            # policies, and no column the policies hide.
            data = {k: v for k, v in data.items() if k not in REDACTED_EVENT_FIELDS}
            for key in ("columns", "added", "promoted"):
                if key in data:
                    data[key] = [
                        c for c in data[key]
                        if (c["name"] if isinstance(c, dict) else c) not in hidden
                    ]  # fmt: skip
        out.append(data)
    return EventPage(out, nxt)


@get("/v1/audit")
async def read_audit(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: Annotated[str, QueryParameter()],
    principal: Annotated[str | None, QueryParameter()] = None,
    table: Annotated[str | None, QueryParameter()] = None,
    kind: Annotated[
        str | None,
        QueryParameter(description="query, event, or an event type such as RowsAppended"),
    ] = None,
    since: Annotated[str | None, QueryParameter(description="ISO-8601 time")] = None,
    until: Annotated[str | None, QueryParameter(description="ISO-8601 time")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The org's audit trail, oldest first: queries (principal, SQL, tables, rows,
    duration) and table events (actor, request id). For org admins."""
    caller = caller_of(request)
    caller.require("grant", org)
    registry = await services.reader.registry()
    if org not in registry.orgs:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    low = parse_time(since) if since else datetime.fromtimestamp(0, UTC)
    high = parse_time(until) if until else datetime.now(UTC) + timedelta(seconds=1)
    entries, more = await audit_entries(
        services.redis,
        services.log,
        services.keys,
        org,
        sorted(registry.orgs[org].supers),
        since=low,
        until=high,
        principal=principal,
        table=table,
        kind=kind,
        limit=limit,
    )
    return {"entries": entries, "more": more}


@get("/v1/config")
async def effective_config(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> dict[str, Any]:
    """The effective settings, secrets redacted. For platform admins."""
    if not caller_of(request).admin:
        raise Forbidden("only a platform admin reads the configuration")
    return services.settings.redacted()


V1_HANDLERS = [ingest_rows, delete_rows, restore_table, compact_table, describe_version,
               list_orgs, list_supers, list_tables, describe_table, drop_table, set_mirrors,
               set_policies,
               table_history,
               run_query, validate_query, super_meta, service_info,
               list_events, read_audit, effective_config]  # fmt: skip
V1 = Router(path="/", route_handlers=[*V1_HANDLERS, *ADMIN_HANDLERS], guards=[require_token])
ROUTES: list[Any] = [health, metrics, V1]
DEPENDENCIES = {"services": Provide(provide_services, sync_to_thread=False)}
