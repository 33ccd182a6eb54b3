"""The audit trail: the event log of what the caller can read, and the org's audit of
queries and table events.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from app.access.audit import audit_entries, check_cursor, scan_org, scan_super
from app.access.visibility import SuperVisibility
from app.api.guards import caller_of
from app.api.routes.params import error_responses
from app.api.schemas import EventPage
from app.services import Services
from events.errors import InvalidInput, NotFound
from events.model import to_builtins
from projections.query.analysis import parse_time


@get("/v1/events", responses=error_responses(400, 404))
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
    # What the caller's policies let it see of each event (one catalog read per super).
    seen: dict[str, SuperVisibility] = {}
    if not caller.admin:
        for sup in {e.super_ for e in shown if e.table}:
            seen[sup] = SuperVisibility(caller, await services.reader.super_state(org, sup))
    out, reasons = [], set()
    for event in shown:
        data = to_builtins(event)
        if event.super_ in seen and event.table:
            visible = seen[event.super_].of_event(event)
            data = visible.event(data)
            if "withheld" in data:
                reasons.add(visible.reason)
        out.append(data)
    if not reasons:
        return EventPage(out, nxt)
    return EventPage(out, nxt, withheld_reason="; ".join(sorted(reasons)))


@get("/v1/audit", responses=error_responses(400, 403, 404))
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
