"""The Litestar application: lifespan, error mapping, request ids and access logs."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from litestar import Litestar, Request, Response, Router

# Private, but the public plugin base would mean copying it; litestar is pinned exactly.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins import ReceiveRoutePlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.routes import BaseRoute, HTTPRoute
from litestar.template.config import TemplateConfig
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from app.access.auth import Forbidden, TooManyRequests, bootstrap_admin
from app.api.guards import require_token
from app.api.iceberg_rest import ICEBERG_HANDLERS, iceberg_error_body, iceberg_error_responses
from app.api.mcp_mount import McpMount
from app.api.routes import DEPENDENCIES, ROUTES
from app.api.routes.params import error_responses
from app.api.schemas import ErrorBody, ErrorResponse
from app.console.pages import CONSOLE, TEMPLATES
from app.console.pages import STATIC as CONSOLE_STATIC
from app.services import Services
from app.settings import Settings
from events.errors import (
    AlreadyExists,
    ConflictError,
    Gone,
    IdempotencyMismatch,
    InvalidInput,
    LedgerError,
    NotFound,
    PayloadTooLarge,
    QueryRejected,
    QueryTimeout,
    TypeMismatch,
    Unauthorized,
    Unavailable,
)

access_log = logging.getLogger("ledgerlake.access")
log = logging.getLogger("ledgerlake")

# The one place where domain errors become HTTP statuses.
STATUS: dict[type[LedgerError], int] = {
    InvalidInput: 400,
    QueryRejected: 400,
    Unauthorized: 401,
    Forbidden: 403,
    TooManyRequests: 429,
    NotFound: 404,
    QueryTimeout: 408,
    Gone: 410,
    ConflictError: 409,
    AlreadyExists: 409,
    PayloadTooLarge: 413,
    TypeMismatch: 422,
    IdempotencyMismatch: 422,
    Unavailable: 503,
}
CODE_STATUS = {"unsupported_media_type": 415}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(status: int, code: str, message: str, **details: Any) -> Response[Any]:
    body = ErrorResponse(ErrorBody(code=code, message=message, details=details))
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return Response(body, status_code=status, headers=headers)


def status_for(exc: LedgerError) -> int:
    return CODE_STATUS.get(exc.code) or next(
        (s for cls, s in STATUS.items() if isinstance(exc, cls)), 500
    )


def handle_ledger_error(_: Request[Any, Any, Any], exc: LedgerError) -> Response[Any]:
    return error_response(status_for(exc), exc.code, exc.message, **exc.details)


def handle_iceberg_error(_: Request[Any, Any, Any], exc: LedgerError) -> Response[Any]:
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(iceberg_error_body(exc, status), status_code=status, headers=headers)


ICEBERG = Router(
    path="/iceberg",
    route_handlers=ICEBERG_HANDLERS,
    guards=[require_token],
    exception_handlers={LedgerError: handle_iceberg_error},
)


def handle_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if request.url.path.startswith("/iceberg/"):
        # Unknown paths and methods (writes) under the Iceberg catalog: the spec's shape.
        kind = {404: "NoSuchTableException", 405: "NotSupportedException"}.get(
            status, "BadRequestException"
        )
        body = {"error": {"message": str(exc.detail), "type": kind, "code": status}}
        return Response(body, status_code=status)
    code = {
        400: "bad_request",
        401: "unauthorized",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
    }.get(status, "http_error")
    details: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and exc.extra:
        code = "invalid_request"
        details["errors"] = exc.extra
    return error_response(status, code, str(exc.detail), **details)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; see the server log")


# On every response: no MIME sniffing, no framing, no referrer, nothing cached.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class RequestIdMiddleware:
    """Gives each request an id (or keeps a sane incoming ``X-Request-ID``), returns it
    as a header, and logs one line per request when it completes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableScopeHeaders.from_message(message)
                headers["x-request-id"] = rid
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                path = scope["path"]
                if path.startswith("/console"):
                    # Console pages set their own policy (scripts and styles of their
                    # own origin only), and a form post must carry its Origin (with no
                    # referrer at all, browsers send "Origin: null").
                    headers["referrer-policy"] = "same-origin"
                    headers.setdefault("content-security-policy", DEFAULT_CSP)
                elif not path.startswith("/schema"):  # Swagger UI needs its scripts
                    headers["content-security-policy"] = DEFAULT_CSP
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
                extra={
                    "request_id": rid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


async def bootstrap_token(services: Services, settings: Settings) -> None:
    """Without ``LEDGERLAKE_API_TOKEN`` and any principal: create the admin token and
    print it once (``serve`` on loopback)."""
    if settings.api_token:
        return
    token = await bootstrap_admin(services.auth, settings.data_dir)
    if token is not None:
        _announce_admin_token(settings, token)


def _announce_admin_token(settings: Settings, token: str) -> None:
    """Print the bootstrapped admin token, once (never through the log handlers)."""
    path = settings.data_dir / "admin-token"
    if settings.log_format == "json":
        line = {
            "time": datetime.now(UTC).isoformat(),
            "level": "WARNING",
            "logger": "ledgerlake.auth",
            "message": "admin token created (shown once)",
            "token": token,
            "file": str(path),
        }
        print(json.dumps(line), file=sys.stderr, flush=True)
        return
    print(
        f"Ledgerlake admin token (shown once; also in {path}, mode 0600):\n  {token}\n"
        "Send it as: Authorization: Bearer <token>",
        file=sys.stderr,
        flush=True,
    )


def _openapi_config() -> OpenAPIConfig:
    """The OpenAPI document's frame: title, the error shape, bearer authentication."""
    return OpenAPIConfig(
        title="Ledgerlake",
        version="0.1.0",
        path="/schema",
        description="Event-sourced data catalog and warehouse. Errors are "
        '{"error": {"code", "message", "details"}}; every response has X-Request-ID.',
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="LEDGERLAKE_API_TOKEN, when the server sets one",
                )
            }
        ),
        security=[{"bearer": []}],
    )


class ImplicitResponses(ReceiveRoutePlugin):
    """Documents on each operation the answers that no handler lists itself, because
    they come from around it: request validation's 400 (with the body the error
    handlers really send, not Litestar's default), and under /v1 and /iceberg the token
    guard's 401, 429 and 503, plus the 404 (and 403) of a handler whose ``perm`` the
    guard checks on the org in its path. A handler's own ``responses`` win."""

    def receive_route(self, route: BaseRoute) -> None:
        if not isinstance(route, HTTPRoute):
            return
        for handler in route.route_handlers:
            # Assigned, never updated in place: the dict is shared with the handler the
            # module defines (each app registers a shallow copy).
            handler.responses = {**_implicit(route, handler), **(handler.responses or {})}


class StrictStructSchemas(StructSchemaPlugin):
    """Request structs refuse unknown fields (``forbid_unknown_fields``, 400
    invalid_request): their schemas say so (``additionalProperties: false``), which
    Litestar's own struct plugin leaves out."""

    def to_openapi_schema(self, field_definition: Any, schema_creator: Any) -> Any:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        struct: type[msgspec.Struct] = field_definition.type_
        if struct.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        return schema


def _implicit(route: HTTPRoute, handler: Any) -> dict[int, ResponseSpec]:
    codes = set()
    params = set(handler.parsed_fn_signature.parameters) - {"request", "services"}
    if route.path_parameters or params:
        codes.add(400)
    # The change target's headers (app/api/routes/params.py): a stale If-Match is 409,
    # an Idempotency-Key reused for another request 422.
    if "if_match" in params:
        codes.add(409)
    if "idempotency_key" in params:
        codes.add(422)
    if route.path.startswith(("/v1/", "/iceberg/")):
        codes |= {401, 429, 503}
        perm = handler.opt.get("perm")
        if perm and "org" in route.path_parameters:
            codes |= {404} if perm == "see" else {403, 404}
    documented = iceberg_error_responses if route.path.startswith("/iceberg/") else error_responses
    return documented(*sorted(codes))


def create_app(
    settings: Settings,
    redis_url: str,
    *,
    run_projector: bool = True,
    bootstrap: bool = False,
    warm: bool = False,
    storage_checked: bool = False,
) -> Litestar:
    """The API. With ``run_projector`` the projections run in this process. With
    ``bootstrap`` (``serve`` on loopback), a deployment without any principal nor
    ``LEDGERLAKE_API_TOKEN`` gets an admin token, printed once and written to
    ``<data-dir>/admin-token``. With ``warm`` (``serve``), the first
    ``LEDGERLAKE_QUERY_WORKERS_WARM`` query workers start with the app. With
    ``storage_checked`` (a process of ``serve --workers``, whose supervisor checked the
    object storage once), storage that cannot be reached at start is logged, not
    fatal: a replacement process starting during an outage must not take ``serve``
    down (uvicorn stops every process when one fails to start)."""

    mcp = McpMount(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = Services.build(settings, redis_url)
        try:
            await services.start()
        except Unavailable as exc:
            if not storage_checked:
                raise
            log.warning("starting while %s; requests that need it answer 503", exc.message)
        app.state.services = services
        if warm:
            services.engine.warm(settings.query_workers_warm)
        if bootstrap:
            await bootstrap_token(services, settings)
        try:
            async with mcp.running(app), anyio.create_task_group() as tg:
                if run_projector:
                    # Cancelled, not stopped, on shutdown: a commit is atomic, so
                    # cancelling anywhere is safe and does not wait out a blocking read.
                    tg.start_soon(services.run_projections, anyio.Event())
                    if settings.compact_interval_s > 0:
                        tg.start_soon(services.compact_forever, settings.compact_interval_s)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await services.close()

    app = Litestar(
        route_handlers=[*ROUTES, ICEBERG, CONSOLE, CONSOLE_STATIC, *mcp.handlers],
        template_config=TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine),
        dependencies=DEPENDENCIES,
        lifespan=[lifespan],
        middleware=[RequestIdMiddleware],
        exception_handlers={
            LedgerError: handle_ledger_error,
            HTTPException: handle_http_error,
            Exception: handle_unexpected,
        },
        openapi_config=_openapi_config(),
        plugins=[ImplicitResponses(), StrictStructSchemas()],
        request_max_body_size=settings.max_body_bytes,
        debug=False,
        logging_config=None,
    )
    app.state.mcp = mcp.backend  # (its limiter's counts are visible to tests)
    return app
