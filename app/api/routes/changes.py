"""Changes to a table's rows: delete, restore a version, compact."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from app.api.routes.params import (
    IdempotencyKey,
    IfMatch,
    SuperName,
    body_fingerprint,
    change_target,
    error_responses,
)
from app.api.schemas import (
    CompactResponse,
    DeleteRequest,
    DeleteResponse,
    RestoreRequest,
    RestoreResponse,
)
from app.services import Services


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/delete",
    status_code=200,
    responses=error_responses(400, 401, 404, 409, 422, 503),
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
    fingerprint = body_fingerprint(request.url.path, data)
    target = change_target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.delete(target, keys=data.keys, where=data.where)
    body = DeleteResponse(
        table, outcome.version, outcome.result["rows_removed"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/restore",
    status_code=200,
    responses=error_responses(400, 401, 404, 409, 410, 503),
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
    fingerprint = body_fingerprint(request.url.path, data)
    target = change_target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    outcome = await services.mutator.restore(target, data.version)
    body = RestoreResponse(table, outcome.version, data.version, outcome.event_id, outcome.replayed)
    return Response(body, headers={"ETag": f'"{outcome.version}"'})


@post(
    "/v1/{org:str}/{super:str}/tables/{table:str}/compact",
    status_code=200,
    responses=error_responses(400, 401, 404, 409, 503),
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
    target = change_target(request, org, super_name, table, None, None, "")
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
