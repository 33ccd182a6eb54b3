"""Who is calling: the bearer-token guard of /v1 and /iceberg, the caller on the
request, and the catalog as the caller may see or read it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler

from app.access.auth import Caller, Forbidden
from app.access.sessions import COOKIE, CSRF_HEADER, csrf_ok
from app.services import Services
from events.errors import Unauthorized
from projections.catalog import SuperState


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
    caller = await current_caller(connection, services)
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


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def current_caller(
    connection: ASGIConnection[Any, Any, Any, Any], services: Services
) -> Caller:
    """Who sends this request, as of now: its bearer token, or on ``/v1`` the web
    console's session cookie. (A long response, such as an event stream, asks again.)"""
    header = connection.headers.get("authorization", "")
    session_id = connection.cookies.get(COOKIE, "")
    if not header and session_id and connection.url.path.startswith("/v1/"):
        return await session_caller(connection, services, session_id)
    return await services.auth.authenticate(header, services.settings.api_token)


async def session_caller(
    connection: ASGIConnection[Any, Any, Any, Any], services: Services, session_id: str
) -> Caller:
    """The caller of a web console session (the API as the console calls it, with its
    session cookie instead of a bearer token): a state-changing request must also carry
    the session's CSRF token in ``X-CSRF-Token``, which no other site can read."""
    session = await services.sessions.get(session_id)
    if session is None:
        raise Unauthorized("the console session ended; sign in again", code="session_ended")
    method = connection.scope.get("method", "GET")
    if method not in SAFE_METHODS and not csrf_ok(session, connection.headers.get(CSRF_HEADER)):
        raise Forbidden(
            f"a console request that changes something needs the {CSRF_HEADER} header",
            code="csrf_failed",
        )
    return await services.auth.caller_again(
        session.principal, session.token, services.settings.api_token
    )


def visible(caller: Caller, state: SuperState) -> SuperState:
    """``state`` with only the tables the caller can see (the views a query gets)."""
    if caller.admin:
        return state
    tables = {
        name: t for name, t in state.tables.items() if caller.sees(state.org, state.name, name)
    }
    return msgspec.structs.replace(state, tables=tables)


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
