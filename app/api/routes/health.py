"""Service-level routes: health, Prometheus metrics, the service's limits and its
effective configuration.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec

from app.access.auth import Forbidden
from app.api.guards import caller_of
from app.api.routes.params import error_responses
from app.api.schemas import ServiceInfo
from app.services import Services
from app.settings import package_version
from events.errors import LedgerError
from events.redis_log import guarded

PROMETHEUS = "text/plain; version=0.0.4"


@get(
    "/health",
    responses={503: ResponseSpec(dict[str, Any], description="Redis cannot be reached")},
)
async def health(services: NamedDependency[Services]) -> Response[dict[str, Any]]:
    """Redis reachability and projection lag. 503 when Redis cannot be reached."""
    started = time.perf_counter()
    try:
        await guarded(services.redis.ping())
        latency = (time.perf_counter() - started) * 1000
        lags = await services.all_lags()
    except LedgerError as exc:
        body = {"status": "degraded", "redis": {"ok": False, "error": exc.message}}
        return Response(body, status_code=503)
    body = {
        "status": "ok",
        "redis": {"ok": True, "latency_ms": round(latency, 2)},
        "projections": lags,
    }
    return Response(body, status_code=200)


@get(
    "/metrics",
    media_type=PROMETHEUS,
    responses={
        503: ResponseSpec(str, media_type=PROMETHEUS, description="Redis cannot be reached")
    },
)
async def metrics(services: NamedDependency[Services]) -> Response[str]:
    """Prometheus metrics: the lag of each projection (the catalog and each mirror
    format), in events and seconds. 503 when Redis cannot be reached."""
    try:
        lags = await services.all_lags()
    except LedgerError as exc:
        return Response(f"# redis unreachable: {exc.message}\n", status_code=503)
    lines = [
        "# HELP ledgerlake_projection_lag_events Events not yet applied by the projection.",
        "# TYPE ledgerlake_projection_lag_events gauge",
    ]
    lines += [
        f'ledgerlake_projection_lag_events{{projection="{name}"}} {lag["lag_events"]}'
        for name, lag in lags.items()
    ]
    lines += [
        "# HELP ledgerlake_projection_lag_seconds Age of the oldest event not yet applied.",
        "# TYPE ledgerlake_projection_lag_seconds gauge",
    ]
    lines += [
        f'ledgerlake_projection_lag_seconds{{projection="{name}"}} {lag["lag_seconds"]}'
        for name, lag in lags.items()
    ]
    lines += [
        "# HELP ledgerlake_mirror_failed_tables Tables whose last mirror publish failed.",
        "# TYPE ledgerlake_mirror_failed_tables gauge",
    ]
    lines += [
        f'ledgerlake_mirror_failed_tables{{projection="{name}"}} {lag["failed_tables"]}'
        for name, lag in lags.items()
        if "failed_tables" in lag
    ]
    return Response("\n".join(lines) + "\n")


@get("/v1/info")
async def service_info(services: NamedDependency[Services]) -> ServiceInfo:
    """The service's version and the limits a client (or an LLM through MCP) works
    within: query rows and timeouts, the largest ingest body, the mirror formats."""
    s = services.settings
    return ServiceInfo(
        name="ledgerlake",
        version=package_version(),
        query={
            "default_limit": s.query_default_limit,
            "max_limit": s.query_max_limit,
            "default_timeout_s": s.query_timeout_s,
            "max_timeout_s": s.query_max_timeout_s,
            "max_result_bytes": s.query_max_result_bytes,
            "max_sql_chars": s.query_max_sql_chars,
        },
        ingest={"max_body_bytes": s.max_body_bytes},
        mirrors=list(s.mirror_formats),
        mcp={
            "path": "/mcp",
            "token_budget": s.mcp_token_budget,
            "timeout_s": s.mcp_timeout_s,
            "max_concurrent_per_principal": s.mcp_max_concurrent_per_principal,
        },
    )


@get("/v1/config", responses=error_responses(403, notes={403: "not a platform admin"}))
async def effective_config(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> dict[str, Any]:
    """The effective settings, secrets redacted. For platform admins."""
    if not caller_of(request).admin:
        raise Forbidden("only a platform admin reads the configuration")
    return services.settings.redacted()
