"""The read side of the Iceberg REST catalog, under ``/iceberg``.

Catalog URI: ``http://host:port/iceberg``. Namespaces are two levels, ``org.super``
(``["acme", "sales"]``). A client that passes ``warehouse=<org>`` gets the org as the
URL prefix (``/iceberg/v1/orgs/<org>/...``) and sees the org's supers as one-level
namespaces: one catalog per org, which suits Trino and DuckDB best.

Only tables whose Iceberg mirror has been published are listed; loading one returns the
mirror's current metadata file (``metadata-location`` and its JSON) and, unless
``LEDGERLAKE_ICEBERG_REST_CREDENTIALS`` is off, the storage settings and credentials a
client needs to read the files. The catalog is read-only: Ledgerlake is the only
writer of its mirrors. Errors have the shape the spec gives
(``{"error": {"message", "type", "code"}}``).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, get, head, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery

from app.access.auth import Caller
from app.access.policies import binds
from app.services import Services
from events.errors import InvalidInput, LedgerError, NotFound
from mirrors.access import access_for
from mirrors.status import MirrorStatuses

ENDPOINTS = [
    "GET /v1/{prefix}/namespaces",
    "GET /v1/{prefix}/namespaces/{namespace}",
    "HEAD /v1/{prefix}/namespaces/{namespace}",
    "GET /v1/{prefix}/namespaces/{namespace}/tables",
    "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}",
]
_BY_STATUS = {
    401: "NotAuthorizedException",
    403: "ForbiddenException",
    429: "SlowDownException",
    503: "ServiceUnavailableException",
}
_TYPES = {
    "table_not_found": "NoSuchTableException",
    "namespace_not_found": "NoSuchNamespaceException",
    "unauthorized": "NotAuthorizedException",
}


class IcebergErrorModel(msgspec.Struct):
    message: str
    type: str
    code: int


class IcebergError(msgspec.Struct):
    """The error body of the Iceberg REST spec."""

    error: IcebergErrorModel


def iceberg_error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """Error responses of the catalog, for the OpenAPI document."""
    described = {
        400: "bad request", 401: "missing or wrong bearer token",
        404: "no such namespace or table (or not granted)",
        429: "over the caller's rate limit; see Retry-After",
        503: "Redis or storage unreachable; retry",
    }  # fmt: skip
    return {c: ResponseSpec(IcebergError, description=described[c]) for c in codes}


def _paths(suffix: str) -> list[str]:
    # The org prefix is ``orgs/<org>``: a fixed first segment, so that no org name (say
    # ``namespaces``) can be mistaken for a route of the unprefixed catalog.
    return [f"/v1{suffix}", f"/v1/orgs/{{prefix:str}}{suffix}"]


def _namespace(text: str, prefix: str | None) -> list[str]:
    """``org\\x1fsuper`` (or ``org.super``), or with an org prefix just ``super``."""
    parts = [p for p in text.replace("\x1f", ".").split(".")]
    if prefix:
        parts = [prefix, *parts]
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise NotFound(f"namespace {text!r} does not exist", code="namespace_not_found")
    return parts


def _shown(parts: list[str], prefix: str | None) -> list[str]:
    return parts[1:] if prefix else parts


async def _require_namespace(services: Services, parts: list[str], caller: Caller) -> None:
    registry = await services.reader.registry()
    org = registry.orgs.get(parts[0])
    hidden = not caller.sees(*parts)  # another tenant's, or not granted: not found
    if hidden or org is None or (len(parts) == 2 and parts[1] not in org.supers):
        raise NotFound(f"namespace {'.'.join(parts)} does not exist", code="namespace_not_found")


async def _published(services: Services, org: str, sup: str, caller: Caller) -> dict[str, str]:
    """Table -> current metadata location, for the tables with a live Iceberg mirror
    that the caller may read."""
    state = await services.reader.super_state(org, sup)
    statuses = await MirrorStatuses(services.redis, services.keys).of_super(org, sup, "iceberg")
    out = {}
    for name, status in statuses.items():
        table = state.tables.get(name)
        if table is None or status.incarnation != table.incarnation:
            continue
        if not caller.can("read", org, sup, name):
            continue
        if binds(caller, org, sup, table):
            continue  # row filters or masks apply: the raw files would bypass them
        if status.metadata_location:
            out[name] = status.metadata_location
    return out


def _prefix(request: Request[Any, Any, Any]) -> str | None:
    """The org in ``/v1/{prefix}/...`` (None on the unprefixed paths). Read from the
    path, not declared as a parameter: on the other path it would become a query one."""
    prefix: str | None = request.path_params.get("prefix")
    return prefix


@get(_paths("/config"), sync_to_thread=False)
def config(warehouse: FromQuery[str | None] = None) -> dict[str, Any]:
    """Catalog configuration. ``warehouse=<org>`` makes the org the URL prefix."""
    overrides = {"prefix": f"orgs/{warehouse}"} if warehouse else {}
    return {"defaults": {}, "overrides": overrides, "endpoints": ENDPOINTS}


@get(_paths("/namespaces"), responses=iceberg_error_responses(404))
async def list_namespaces(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    parent: FromQuery[str | None] = None,
) -> dict[str, Any]:
    prefix = _prefix(request)
    registry = await services.reader.registry()
    if parent is None and not prefix:
        caller: Caller = request.state.caller
        return {"namespaces": [[org] for org in sorted(registry.orgs) if caller.sees(org)]}
    parts = _namespace(parent, prefix) if parent else [prefix or ""]
    await _require_namespace(services, parts, request.state.caller)
    if len(parts) == 2:
        return {"namespaces": []}
    supers = [
        s for s in sorted(registry.orgs[parts[0]].supers) if request.state.caller.sees(parts[0], s)
    ]
    return {"namespaces": [_shown([parts[0], s], prefix) for s in supers]}


@get(_paths("/namespaces/{namespace:str}"), responses=iceberg_error_responses(404))
async def load_namespace(
    request: Request[Any, Any, Any], services: NamedDependency[Services], namespace: FromPath[str]
) -> dict[str, Any]:
    prefix = _prefix(request)
    parts = _namespace(namespace, prefix)
    await _require_namespace(services, parts, request.state.caller)
    return {"namespace": _shown(parts, prefix), "properties": {}}


@head(_paths("/namespaces/{namespace:str}"), status_code=204)
async def namespace_exists(
    request: Request[Any, Any, Any], services: NamedDependency[Services], namespace: FromPath[str]
) -> Response[None]:
    await _require_namespace(
        services, _namespace(namespace, _prefix(request)), request.state.caller
    )
    return Response(None, status_code=204)


@get(_paths("/namespaces/{namespace:str}/tables"), responses=iceberg_error_responses(404))
async def list_tables(
    request: Request[Any, Any, Any], services: NamedDependency[Services], namespace: FromPath[str]
) -> dict[str, Any]:
    prefix = _prefix(request)
    parts = _namespace(namespace, prefix)
    await _require_namespace(services, parts, request.state.caller)
    if len(parts) == 1:
        return {"identifiers": []}
    shown = _shown(parts, prefix)
    names = sorted(await _published(services, parts[0], parts[1], request.state.caller))
    return {"identifiers": [{"namespace": shown, "name": n} for n in names]}


async def _metadata_location(
    services: Services, parts: list[str], table: str, caller: Caller
) -> str:
    await _require_namespace(services, parts, caller)
    if len(parts) == 2:
        location = (await _published(services, parts[0], parts[1], caller)).get(table)
        if location:
            return location
    raise NotFound(
        f"table {'.'.join(parts)}.{table} does not exist or has no Iceberg mirror yet",
        code="table_not_found",
    )


@get(
    _paths("/namespaces/{namespace:str}/tables/{table:str}"),
    responses=iceberg_error_responses(404),
)
async def load_table(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    namespace: FromPath[str],
    table: FromPath[str],
) -> dict[str, Any]:
    parts = _namespace(namespace, _prefix(request))
    location = await _metadata_location(services, parts, table, request.state.caller)
    access = access_for(services.storage)
    try:
        raw = await anyio.to_thread.run_sync(access.read, location)
    except FileNotFoundError:  # dropped (or turned off) just now
        raise NotFound(
            f"table {'.'.join(parts)}.{table} has no Iceberg mirror any more",
            code="table_not_found",
        ) from None
    body: dict[str, Any] = {"metadata-location": location, "metadata": json.loads(raw)}
    # The service's storage keys reach every org's files: only platform admins get them.
    vend = services.settings.iceberg_rest_credentials and request.state.caller.admin
    body["config"] = access.client_config() if vend else {}
    return body


@head(_paths("/namespaces/{namespace:str}/tables/{table:str}"), status_code=204)
async def table_exists(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    namespace: FromPath[str],
    table: FromPath[str],
) -> Response[None]:
    await _metadata_location(
        services, _namespace(namespace, _prefix(request)), table, request.state.caller
    )
    return Response(None, status_code=204)


@post(_paths("/namespaces/{namespace:str}/tables/{table:str}/metrics"), status_code=204)
async def report_metrics(namespace: FromPath[str], table: FromPath[str]) -> None:
    """Scan reports from Java clients: accepted and dropped."""


def iceberg_error_body(exc: LedgerError, status: int) -> dict[str, Any]:
    """The error shape of the Iceberg REST spec."""
    kind = _TYPES.get(exc.code) or _BY_STATUS.get(status)
    if kind is None:
        kind = "BadRequestException" if isinstance(exc, InvalidInput) else type(exc).__name__
    return {"error": {"message": exc.message, "type": kind, "code": status}}


ICEBERG_HANDLERS = [
    config,
    list_namespaces,
    load_namespace,
    namespace_exists,
    list_tables,
    load_table,
    table_exists,
    report_metrics,
]
