"""The audit trail: the event log of what the caller can read, and the org's audit of
queries and table events.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from app.access.audit import audit_entries, check_cursor, scan_org, scan_super
from app.access.auth import Caller
from app.access.visibility import SuperVisibility
from app.api.guards import caller_of, current_caller
from app.api.routes.params import error_responses
from app.api.schemas import EventPage
from app.services import Services
from events.errors import InvalidInput, LedgerError, NotFound, Unavailable
from events.model import stream_id_tuple, to_builtins
from events.redis_log import guarded
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
    supers = await _check_scope(caller, services, org, super_name, table)
    return await _page(caller, services, org, super_name, table, supers, check_cursor(after), limit)


async def _check_scope(
    caller: Caller, services: Services, org: str, super_name: str | None, table: str | None
) -> list[str]:
    """The supers whose events a request for ``org`` (and ``super_name``) reads."""
    caller.require_visible(org)
    if super_name is not None:
        caller.require_visible(org, super_name, table or "")
    registry = await services.reader.registry()
    if org not in registry.orgs:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    if super_name is None:
        if table is not None:
            raise InvalidInput("'table' needs 'super'", code="invalid_filter")
        return sorted(registry.orgs[org].supers)
    await services.reader.require_super(org, super_name)
    return [super_name]


async def _page(
    caller: Caller,
    services: Services,
    org: str,
    super_name: str | None,
    table: str | None,
    supers: list[str],
    cursor: str,
    limit: int,
) -> EventPage:
    if super_name is None:
        events, nxt = await scan_org(services.log, org, supers, after=cursor, limit=limit)
    else:
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


# The events of the registry stream (an org-wide cursor names it ``<id>@``).
REGISTRY_EVENTS = frozenset({"OrgCreated", "SuperCreated"})
# How long a follower waits for new events before it sends a keep-alive comment.
FOLLOW_WAIT_MS = 15_000
# Followers one process serves at once (each holds a Redis connection while it waits).
MAX_FOLLOWERS = 200
_followers = [0]


@get(
    "/v1/events/stream",
    responses=error_responses(400, 404, 503),
    media_type="text/event-stream",
)
async def follow_events(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: Annotated[str, QueryParameter()],
    super_name: Annotated[str | None, QueryParameter(name="super")] = None,
    table: Annotated[str | None, QueryParameter()] = None,
    after: Annotated[
        str, QueryParameter(description="event id cursor; `$`: only events from now on")
    ] = "$",
    timeout_s: Annotated[
        float | None,
        QueryParameter(gt=0, le=86400, description="end the stream after this many seconds"),
    ] = None,
) -> ServerSentEvent:
    """The same events as ``/v1/events``, as server-sent events that follow the log:
    one ``event`` message per event (its id is the cursor to resume from, which
    browsers send back as ``Last-Event-ID``), and a comment every 15 s while nothing
    happens. The caller's grants and policies are applied to every event, as of when
    it is sent. ``timeout_s`` ends the stream after that long (a client that polls)."""
    caller = caller_of(request)
    supers = await _check_scope(caller, services, org, super_name, table)
    resume = request.headers.get("last-event-id") or after
    cursor = await _latest(services, org, supers) if resume == "$" else check_cursor(resume)
    if _followers[0] >= MAX_FOLLOWERS:
        raise Unavailable("too many event followers on this server; retry shortly")

    deadline = time.monotonic() + timeout_s if timeout_s else None

    async def messages() -> AsyncIterator[ServerSentEventMessage]:
        nonlocal caller, cursor, supers
        _followers[0] += 1
        try:
            while True:
                frontier = await _latest(services, org, supers)
                page = await _page(caller, services, org, super_name, table, supers, cursor, 100)
                for data in page.events:
                    at = data["id"]
                    if super_name is None:  # org-wide cursors name the stream
                        source = "" if data["type"] in REGISTRY_EVENTS else data["super"]
                        at = f"{at}@{source}"
                    yield ServerSentEventMessage(data=msgspec.json.encode(data).decode(),
                                                 event="event", id=str(at))  # fmt: skip
                    cursor = str(at)
                if page.next_after is not None:
                    cursor = page.next_after
                    continue  # more to read now
                # Read to the end: what the page did not show (other tables, what the
                # caller may not read) is behind the follower too, or the wait below
                # would wake at once for it, again and again.
                if stream_id_tuple(frontier) > stream_id_tuple(cursor.partition("@")[0]):
                    cursor = frontier
                wait_ms = FOLLOW_WAIT_MS
                if deadline is not None:
                    wait_ms = min(wait_ms, int((deadline - time.monotonic()) * 1000))
                    if wait_ms <= 0:
                        return
                try:
                    woke = await _wait(services, org, supers, cursor, max(wait_ms, 1))
                except Unavailable:
                    # Redis went away, or the client did (redis-py turns the cancel of a
                    # blocked read into a timeout): the stream ends, the client resumes.
                    return
                if not woke:
                    yield ServerSentEventMessage(comment="keep-alive", data=None)
                # Revoked, expired, signed out or regranted meanwhile: as of now.
                try:
                    caller = await current_caller(request, services)
                    supers = await _check_scope(caller, services, org, super_name, table)
                except LedgerError:
                    return  # (the stream ends; a reconnect gets the error itself)
        finally:
            _followers[0] -= 1

    return ServerSentEvent(messages())


def _streams(services: Services, org: str, supers: list[str]) -> list[str]:
    return [services.keys.registry_stream, *(services.keys.stream(org, s) for s in supers)]


async def _latest(services: Services, org: str, supers: list[str]) -> str:
    """A cursor past every event there is now."""
    pipe: Any = services.redis.pipeline(transaction=False)
    for stream in _streams(services, org, supers):
        pipe.xrevrange(stream, count=1)
    newest = "0-0"
    for last in await guarded(pipe.execute()):
        if last:
            raw = last[0][0]
            eid = raw.decode() if isinstance(raw, bytes) else str(raw)
            newest = max(newest, eid, key=stream_id_tuple)
    return newest


async def _wait(services: Services, org: str, supers: list[str], cursor: str, wait_ms: int) -> bool:
    """Wait until a stream of the scope has an entry past ``cursor`` (True) or the
    keep-alive interval passed (False). The scan that follows reads from ``cursor``
    again, so an event that lands between the scan and this wait is never lost."""
    position = cursor.partition("@")[0]
    streams: Any = dict.fromkeys(_streams(services, org, supers), position)
    found: Any = await guarded(services.redis.xread(streams, count=1, block=wait_ms))
    return bool(found)


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
