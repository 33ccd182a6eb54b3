"""The MCP server: catalog and query tools for LLM clients (official ``mcp`` SDK).

Every tool is a client of Ledgerlake's HTTP API with the caller's own bearer token
(``app/mcp/client.py``): inside ``serve`` through the app in process, for ``ledgerlake
mcp`` through a running server. Authentication, tenancy, grants, row-level security,
query limits, rate limits and the audit are therefore the API's, with no second
implementation to drift. The package adds what is particular to LLM clients: tool
descriptions (``tools/``), a response budget in estimated tokens (``budget.py``),
per-principal and overall concurrency limits, a per-call timeout, and errors as tool
errors (``backend.py``). This module builds the server and runs its transports.

Transports: stdio (``ledgerlake mcp``) and streamable HTTP, stateless and with JSON
responses, so any API pod can answer any request (no sticky sessions)."""

from __future__ import annotations

import json
import logging

import anyio
import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from app.mcp.backend import Backend, McpConfig
from app.mcp.client import ApiError, path
from app.mcp.gate import (
    METADATA_PATHS,
    BearerGate,
    base_url,
    protected_resource_metadata,
    send_json,
)
from app.mcp.tools import audit, catalog, profile, query, service
from app.settings import Settings, package_version

log = logging.getLogger("ledgerlake.mcp")

INSTRUCTIONS = """\
Ledgerlake is a data catalog and SQL warehouse. Data is organised as org -> super (a
schema of tables) -> table. Start with list_orgs, list_supers and list_tables (or
search_columns), read describe_table before writing SQL, and prefer aggregates, LIMIT
and explicit column lists: results are capped to a token budget. SQL is DuckDB's
dialect, read-only (one SELECT), and names tables of one super by their bare names.
You only see what your credential is granted; a name you cannot see does not exist."""


def build_server(backend: Backend) -> MCPServer:
    """The MCP server with every Ledgerlake tool, resource and prompt."""
    mcp = MCPServer(name="ledgerlake", version=package_version(), instructions=INSTRUCTIONS)
    for tools in (service, catalog, profile, query, audit):  # the order a client lists them
        tools.register(mcp, backend)
    _register_resources(mcp, backend)
    _register_prompts(mcp)
    return mcp


def _register_resources(server: MCPServer, backend: Backend) -> None:
    """The table_schema resource."""

    @server.resource(
        "schema://{org}/{super}/{table}",
        name="table_schema",
        description="A table's columns (name, type, nullability), version and row count.",
        mime_type="application/json",
    )
    async def table_schema(org: str, super: str, table: str, ctx: Context) -> str:
        try:
            async with backend.call(ctx) as api:
                detail = await api.get(path(org, super, "tables", table))
        except ToolError as exc:
            raise ResourceError(str(exc)) from None
        keep = ("org", "super", "name", "version", "row_count", "columns")
        return json.dumps({k: detail.get(k) for k in keep}, default=str)


def _register_prompts(server: MCPServer) -> None:
    """The prompts explore_super and answer_question."""

    @server.prompt(
        description="Explore a super: what its tables hold, how they relate, and which "
        "questions the data can answer."
    )
    def explore_super(org: str, super: str) -> list[UserMessage]:
        return [
            UserMessage(
                f"Explore the Ledgerlake super {org}/{super}. First call get_super_meta "
                f'(org="{org}", super="{super}"), then describe_table for each table, '
                "and sample_rows on the ones whose purpose is unclear. Look for key columns "
                "shared between tables (search_columns helps) and check a candidate join "
                "with validate_sql, then a small query_sql with aggregates. Summarise: "
                "what each table holds, its grain, how tables join, data quality issues "
                "(nulls, odd values: profile_column) and five questions the data can answer."
            )
        ]

    @server.prompt(description="Answer a question with SQL over a super, checking the query first.")
    def answer_question(org: str, super: str, question: str) -> list[UserMessage]:
        return [
            UserMessage(
                f"Answer this question from the Ledgerlake super {org}/{super}: {question}\n"
                "Steps: find the relevant tables (list_tables, search_columns), read their "
                "schemas (describe_table), write one DuckDB SELECT, check it with "
                "validate_sql, then run it with query_sql. Aggregate in SQL rather than "
                "fetching rows. State the SQL you ran and the table versions it read "
                "(describe_table shows them) with the answer."
            )
        ]


NO_REBINDING_CHECK = TransportSecuritySettings(enable_dns_rebinding_protection=False)
"""Every MCP request needs a bearer token, which a page in a victim's browser does not
have, so the Host/Origin allow-list against DNS rebinding adds nothing and would refuse
any deployment's real host name."""


def streamable_app(server: MCPServer, endpoint: str) -> ASGIApp:
    """The SDK's streamable HTTP app: stateless (any pod answers any request) with JSON
    responses (no server-sent event streams to keep open)."""
    return server.streamable_http_app(
        streamable_http_path=endpoint,
        stateless_http=True,
        json_response=True,
        transport_security=NO_REBINDING_CHECK,
    )


def standalone_app(settings: Settings, api_url: str) -> ASGIApp:
    """``ledgerlake mcp --transport http``: the MCP endpoint at ``/mcp`` (and its RFC
    9728 metadata) in front of a running Ledgerlake at ``api_url``, to which each
    caller's own token is passed."""
    backend = Backend(McpConfig.from_settings(settings))
    inner = streamable_app(build_server(backend), "/mcp")
    gate = BearerGate(inner, backend, settings.public_url)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            async with httpx.AsyncClient(base_url=api_url, timeout=settings.mcp_timeout_s) as c:
                backend.client = c
                await inner(scope, receive, send)  # runs the SDK's session manager
            return
        if scope["type"] == "http" and scope["path"] in METADATA_PATHS:
            doc = protected_resource_metadata(base_url(scope, settings.public_url), settings)
            await send_json(send, 200, doc)
            return
        await gate(scope, receive, send)

    return app


def run_stdio(settings: Settings, api_url: str, token: str) -> None:
    """``ledgerlake mcp``: the tools over stdio, calling the API at ``api_url`` as
    ``token``."""
    backend = Backend(McpConfig.from_settings(settings), token=token)
    server = build_server(backend)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=api_url, timeout=settings.mcp_timeout_s) as c:
            backend.client = c
            try:  # a bad URL or token shows in the MCP client's server log at once
                who = await backend.api(f"Bearer {token}").get("/v1/whoami")
                log.info("MCP over stdio for %s at %s", who["principal"]["name"], api_url)
            except ApiError as exc:
                log.warning("Ledgerlake at %s refused the token: %s", api_url, exc.message)
            await server.run_stdio_async()

    anyio.run(main)
