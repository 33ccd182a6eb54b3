"""The audit tool: list_events, the events of an org, a super or a table."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from app.mcp.backend import Backend
from app.mcp.budget import _shrinking
from app.mcp.tools.common import READ_ONLY, Org, Reply, answer


def register(server: MCPServer, backend: Backend) -> None:
    """Registers list_events."""
    budget = backend.config.token_budget

    @server.tool(
        description="The audit trail: the events (writes, schema changes, deletes, grants "
        "of policies) of an org, a super or one table, oldest first, with who did what "
        "and when. Continue with next_after.",
        annotations=READ_ONLY,
    )
    async def list_events(
        ctx: Context,
        org: Org,
        super: Annotated[str | None, Field(description="Only this super")] = None,
        table: Annotated[str | None, Field(description="Only this table (needs super)")] = None,
        after: Annotated[str | None, Field(description="next_after of a previous page")] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="Most events to return")] = 50,
    ) -> Reply:
        async with backend.call(ctx) as api:
            page = await _shrinking(
                lambda n: api.get(
                    "/v1/events", org=org, super=super, table=table, after=after, limit=n
                ),
                "events",
                limit,
                budget,
            )
        return answer(page, budget)
