"""Row-level security and column masking of a table (``PoliciesSet``)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, put
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
from app.api.schemas import PoliciesRequest, PoliciesResponse
from app.services import Services
from events.model import Policy


@put(
    "/v1/{org:str}/{super:str}/tables/{table:str}/policies",
    status_code=200,
    responses=error_responses(400, 401, 403, 404, 409, 503),
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
    fingerprint = body_fingerprint(request.url.path, data)
    target = change_target(request, org, super_name, table, if_match, idempotency_key, fingerprint)
    custom = tuple((await services.auth.state()).roles.get(org, {}))
    outcome = await services.mutator.set_policies(target, policies, custom)
    body = PoliciesResponse(
        table, outcome.version, outcome.result["policies"], outcome.event_id, outcome.replayed
    )
    return Response(body, headers={"ETag": f'"{outcome.version}"'})
