"""SQL queries: validate (check, bind, plan) and run, with each table as the caller's
policies make it, the query audit, and the result formats (JSON, CSV, Arrow).
"""

from __future__ import annotations

import io
import time
from typing import Any

import anyio
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from app.access.audit import ReadRecord, record_read
from app.access.auth import Caller
from app.access.policies import restrict
from app.api.guards import caller_of, readable, request_id
from app.api.routes.params import SuperName, error_responses
from app.api.schemas import QueryColumn, QueryPlanOut, QueryRequest, QueryResponse
from app.services import Services
from events.errors import InvalidInput, LedgerError
from events.model import now
from projections.arrow import from_arrow, normalize_type, type_name
from projections.query.types import Analysis, QueryResult, Resolver, Restricted, ViewSource

ARROW_STREAM = "application/vnd.apache.arrow.stream"


# Query results carry decimals (e.g. sum() over integers) as JSON numbers, not strings.
_RESULT_ENCODER = msgspec.json.Encoder(decimal_format="number")


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
    responses=error_responses(400, 401, 404, 410, 503),
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
    responses=error_responses(400, 401, 404, 408, 410, 503),
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
    return _encoded(result, request.headers.get("accept", ""))


def _encoded(result: QueryResult, accept: str) -> Response[Any]:
    """The result in the format ``Accept`` asks for: CSV, an Arrow IPC stream or JSON."""
    table = result.table
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
