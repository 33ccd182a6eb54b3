"""HTTP route handlers. They parse and authorize; the services do the work."""

from __future__ import annotations

import hashlib
import hmac
import io
import time
from typing import Annotated, Any

import anyio
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, PathParameter, QueryParameter

from app.audit import check_cursor, history_fields, scan_org, scan_super
from app.ingest import format_for_content_type
from app.schemas import (
    ErrorResponse,
    EventPage,
    History,
    HistoryEntry,
    IngestResponse,
    OrgList,
    OrgOut,
    QueryColumn,
    QueryRequest,
    QueryResponse,
    SuperList,
    SuperOut,
    TableDetail,
    TableList,
    table_detail,
    table_summary,
)
from app.services import Services
from app.writes import IngestRequest, check_name
from events.errors import InvalidInput, LedgerError, NotFound, PayloadTooLarge, Unauthorized
from events.model import to_builtins
from events.redis_log import guarded
from projections.arrow import from_arrow, normalize_type, type_name

ARROW_STREAM = "application/vnd.apache.arrow.stream"
SuperName = Annotated[str, PathParameter(name="super", description="the super table (catalog)")]


# Error responses, for the OpenAPI document (the body is always ErrorResponse).
def _errors(*codes: int) -> dict[int, ResponseSpec]:
    described = {
        400: "bad input or a refused query", 401: "missing or wrong bearer token",
        404: "unknown org, super or table", 408: "the query ran past its timeout",
        409: "If-Match is stale (details.current_version)", 413: "body larger than the limit",
        415: "unsupported Content-Type", 422: "type mismatch, or a reused Idempotency-Key",
        503: "Redis or storage unreachable; retry",
    }  # fmt: skip
    return {c: ResponseSpec(ErrorResponse, description=described[c]) for c in codes}


# Query results carry decimals (e.g. sum() over integers) as JSON numbers, not strings.
_RESULT_ENCODER = msgspec.json.Encoder(decimal_format="number")


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def actor_for(request: Request[Any, Any, Any]) -> str:
    return "api-token" if request.app.state.services.settings.api_token else "anonymous"


def request_id(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


async def require_token(
    connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
) -> None:
    """With ``LEDGERLAKE_API_TOKEN`` set, /v1 needs ``Authorization: Bearer <token>``."""
    expected = connection.app.state.services.settings.api_token
    if not expected:
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected.encode()):
        raise Unauthorized("missing or wrong bearer token", code="unauthorized")


@get("/health")
async def health(services: NamedDependency[Services]) -> Response[dict[str, Any]]:
    """Redis reachability and projection lag. 503 when Redis cannot be reached."""
    started = time.perf_counter()
    try:
        await guarded(services.redis.ping())
        latency = (time.perf_counter() - started) * 1000
        lag = await services.projection_lag()
    except LedgerError as exc:
        body = {"status": "degraded", "redis": {"ok": False, "error": exc.message}}
        return Response(body, status_code=503)
    body = {
        "status": "ok",
        "redis": {"ok": True, "latency_ms": round(latency, 2)},
        "projections": {"catalog": lag},
    }
    return Response(body, status_code=200)


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


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/rows",
    status_code=200,
    responses=_errors(400, 401, 409, 413, 415, 422, 503),
)
async def ingest_rows(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    mode: Annotated[str, QueryParameter(description="append or overwrite")] = "append",
    if_match: Annotated[
        str | None,
        HeaderParameter(name="If-Match", description="expected table version (-1: new)"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(name="Idempotency-Key", description="retries return the first result"),
    ] = None,
) -> Response[IngestResponse]:
    """Append (or overwrite with ``mode=overwrite``) rows. The body format follows
    Content-Type: JSON array, NDJSON, CSV, Parquet or Arrow IPC stream."""
    for kind, name in (("org", org), ("super", super_name), ("table", table)):
        check_name(kind, name)
    fmt = format_for_content_type(request.headers.get("content-type"))
    expected_version = _parse_if_match(if_match)
    limit = services.settings.max_body_bytes
    staged = services.storage.staging_file(".body")
    digest = hashlib.sha256(f"{org}/{super_name}/{table}|{mode}|{fmt}|".encode())
    try:
        size = 0
        async with await anyio.open_file(staged, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
                digest.update(chunk)
                await fh.write(chunk)
        if size == 0:
            raise InvalidInput("the request body is empty", code="empty_body")
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


@get("/v1/orgs")
async def list_orgs(services: NamedDependency[Services]) -> OrgList:
    registry = await services.reader.registry()
    orgs = [OrgOut(o.name, len(o.supers), o.created_at) for o in registry.orgs.values()]
    return OrgList(sorted(orgs, key=lambda o: o.name))


@get("/v1/{org:str}/supers")
async def list_supers(services: NamedDependency[Services], org: FromPath[str]) -> SuperList:
    registry = await services.reader.registry()
    info = registry.orgs.get(org)
    if info is None:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    supers = []
    for sup in sorted(info.supers.values(), key=lambda s: s.name):
        state = await services.reader.super_state(org, sup.name)
        supers.append(SuperOut(sup.name, len(state.tables), sup.created_at))
    return SuperList(org, supers)


@get("/v1/{org:str}/{super:str}/tables")
async def list_tables(
    services: NamedDependency[Services], org: FromPath[str], super_name: SuperName
) -> TableList:
    state = await services.reader.require_super(org, super_name)
    tables = [table_summary(t) for t in sorted(state.tables.values(), key=lambda t: t.name)]
    return TableList(org, super_name, tables)


@get("/v1/{org:str}/{super:str}/tables/{table:str}", responses=_errors(401, 404))
async def describe_table(
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
) -> Response[TableDetail]:
    found = await services.reader.require_table(org, super_name, table)
    # The version is the entity tag: send it back as If-Match to write conditionally.
    return Response(table_detail(org, super_name, found), headers={"ETag": f'"{found.version}"'})


@get("/v1/{org:str}/{super:str}/tables/{table:str}/history")
async def table_history(
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    after: Annotated[str, QueryParameter(description="event id cursor")] = "0-0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> History:
    """One entry per version, oldest first, paged with ``after`` = ``next_after``."""
    await services.reader.require_table(org, super_name, table)
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
                columns_added=columns,
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


@post(
    "/v1/{org:str}/{super:str}/query", status_code=200, responses=_errors(400, 401, 404, 408, 503)
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
    state = await services.reader.require_super(org, super_name)
    result = await services.engine.run(state, data.sql, limit=data.limit, timeout_s=data.timeout_s)
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
    services: NamedDependency[Services],
    org: Annotated[str, QueryParameter()],
    super_name: Annotated[str | None, QueryParameter(name="super")] = None,
    table: Annotated[str | None, QueryParameter()] = None,
    after: Annotated[str, QueryParameter(description="event id cursor")] = "0-0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> EventPage:
    """The audit log, straight from the streams, oldest first."""
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
    return EventPage([to_builtins(e) for e in events], nxt)


V1_HANDLERS = [ingest_rows, list_orgs, list_supers, list_tables, describe_table,
               table_history, run_query, list_events]  # fmt: skip
V1 = Router(path="/", route_handlers=V1_HANDLERS, guards=[require_token])
ROUTES: list[Any] = [health, V1]
DEPENDENCIES = {"services": Provide(provide_services, sync_to_thread=False)}
