"""The tools about the service and the caller: health, info (versions and limits) and
whoami."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from app.mcp.backend import Backend
from app.mcp.client import ApiError
from app.mcp.tools.common import READ_ONLY, Reply, answer, fetch
from app.settings import package_version


def register(server: MCPServer, backend: Backend) -> None:
    """Registers health, info and whoami."""
    budget = backend.config.token_budget

    @server.tool(
        description="Whether the Ledgerlake service is up: Redis reachability and how far "
        "behind its projections and mirrors are.",
        annotations=READ_ONLY,
    )
    async def health(ctx: Context) -> Reply:
        async with backend.call(ctx) as api:
            try:
                result: dict[str, Any] = await api.get("/health")
            except ApiError as exc:  # 503 is a health answer, not a failure
                if exc.status != 503:
                    raise
                return answer({"status": "unavailable", "detail": exc.message}, budget)
            return answer(result, budget)

    @server.tool(
        description="The Ledgerlake service's version and the limits you work within: "
        "query row limit and timeouts, this MCP server's response budget and call "
        "timeout, and the supported MCP protocol revisions.",
        annotations=READ_ONLY,
    )
    async def info(ctx: Context) -> Reply:
        async with backend.call(ctx) as api:
            service: dict[str, Any] = await api.get("/v1/info")
        service["mcp_server"] = {
            "version": package_version(),
            "protocol_revisions": [*HANDSHAKE_PROTOCOL_VERSIONS, *MODERN_PROTOCOL_VERSIONS],
            "token_budget": budget,
            "timeout_s": backend.config.timeout_s,
            "max_concurrent_per_principal": backend.config.max_concurrent_per_principal,
        }
        return answer(service, budget)

    @server.tool(
        description="Who you are to Ledgerlake: your principal (name, org, attributes), "
        "the token you use and your grants (role on an org, super or table).",
        annotations=READ_ONLY,
    )
    async def whoami(ctx: Context) -> Reply:
        return await fetch(backend, ctx, "/v1/whoami")
