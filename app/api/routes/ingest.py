"""POST rows: stream the body to a staging file, then append, overwrite or upsert it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, HeaderParameter, QueryParameter

from app.api.guards import actor_for, request_id
from app.api.routes.params import SuperName, change_target, error_responses, parse_if_match
from app.api.schemas import IngestResponse, UpsertResponse
from app.services import Services
from app.write.bodies import format_for_content_type, open_source
from app.write.changes.commit import Outcome, Target
from app.write.request import IngestRequest, check_name
from events.errors import InvalidInput, PayloadTooLarge

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


_SCALAR = Schema(
    one_of=[
        Schema(type=t)
        for t in (OpenAPIType.STRING, OpenAPIType.NUMBER, OpenAPIType.BOOLEAN, OpenAPIType.NULL)
    ]
)
_ROWS = Schema(
    type=OpenAPIType.ARRAY,
    items=Schema(type=OpenAPIType.OBJECT, additional_properties=_SCALAR),
    description="one object per row (lists and objects are accepted as values too)",
)
_TEXT = Schema(type=OpenAPIType.STRING)
_BYTES = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)


@dataclass
class RowsOperation(Operation):
    """POST rows' body, which the handler streams itself (so Litestar sees no ``data``
    to document): a JSON array, NDJSON or CSV text, or a Parquet file or Arrow IPC
    stream, by Content-Type."""

    def __post_init__(self) -> None:
        media = {
            "application/json": _ROWS,
            "application/x-ndjson": _TEXT,
            "text/csv": _TEXT,
            "application/vnd.apache.parquet": _BYTES,
            "application/vnd.apache.arrow.stream": _BYTES,
        }
        self.request_body = RequestBody(
            content={k: OpenAPIMediaType(schema=v) for k, v in media.items()}, required=True
        )


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/rows",
    status_code=200,
    operation_class=RowsOperation,
    responses=error_responses(400, 401, 404, 409, 413, 415, 422, 503),
    opt={"perm": "write"},
)
async def ingest_rows(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: FromPath[str],
    super_name: SuperName,
    table: FromPath[str],
    mode: Annotated[
        str,
        QueryParameter(
            description="append, overwrite or upsert",
            # Documented as the enum it is; checked by the writer (400 invalid_mode).
            schema_extra={"enum": ["append", "overwrite", "upsert"]},
        ),
    ] = "append",
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
    expected_version = parse_if_match(if_match)
    limit = services.settings.max_body_bytes
    staged = services.storage.staging_file(".body")
    digest = hashlib.sha256(f"{org}/{super_name}/{table}|{mode}|{key}|{newer_than}|{fmt}|".encode())
    try:
        size = await _stage_body(request, staged, digest, limit)
        if size == 0:
            raise InvalidInput("the request body is empty", code="empty_body")
        if mode == "upsert":
            assert key is not None
            target = change_target(
                request, org, super_name, table, if_match, idempotency_key, digest.hexdigest()
            )
            outcome = await _upsert(services, target, staged, fmt, key.split(","), newer_than)
            return _upsert_response(table, outcome)
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


def _upsert_response(table: str, outcome: Outcome) -> Response[IngestResponse | UpsertResponse]:
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
