"""The SQL tools: validate_sql (check and plan without running) and query_sql (run one
read-only SELECT, its rows cut to the budget and continued by a cursor)."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from app.mcp.backend import Backend
from app.mcp.budget import _rows_page, decode_cursor, estimate_tokens
from app.mcp.client import ApiError, path
from app.mcp.tools.common import READ_ONLY, Org, Reply, Super, answer, run_query


def register(server: MCPServer, backend: Backend) -> None:
    """Registers validate_sql and query_sql."""
    _register_validate_sql(server, backend)
    _register_query_sql(server, backend)


def _register_validate_sql(server: MCPServer, backend: Backend) -> None:
    """validate_sql."""
    budget = backend.config.token_budget

    @server.tool(
        description="Check a SQL query without running it: parsed, checked against the "
        "read-only rules and bound to the tables you can read, then planned. Returns "
        "valid, the columns it would return (name, type), the tables it reads and "
        "DuckDB's plan; or valid false with the error.",
        annotations=READ_ONLY,
    )
    async def validate_sql(
        ctx: Context,
        org: Org,
        super: Super,
        sql: Annotated[str, Field(description="One SELECT (DuckDB dialect)")],
        as_of_version: Annotated[
            int | None, Field(description="Plan against that version of the one table")
        ] = None,
    ) -> Reply:
        async with backend.call(ctx) as api:
            try:
                plan: dict[str, Any] = await api.post(
                    path(org, super, "query", "validate"),
                    {"sql": sql, "as_of_version": as_of_version},
                )
            except ApiError as exc:
                if exc.status != 400:
                    raise
                return answer(
                    {"valid": False, "error": {"code": exc.code, "message": exc.message}}, budget
                )
        if estimate_tokens(plan) > budget:
            plan["plan"] = plan["plan"][: budget * 2] + "\n... (plan cut to fit the budget)"
        return answer(plan, budget)


def _register_query_sql(server: MCPServer, backend: Backend) -> None:
    """query_sql."""
    budget = backend.config.token_budget

    @server.tool(
        description="Run one read-only SELECT (DuckDB dialect) over the tables of a super, "
        "named by their bare names. Returns columns (name, type) and rows as arrays. "
        "Results are capped to the response budget: when cut, the reply says so and "
        "gives next_cursor (pass it back as cursor, with no sql, for the next rows; add "
        "ORDER BY for a stable order). Prefer aggregates and LIMIT. Past versions: "
        "as_of_version (a query of one table), as_of_time, or `t AT (VERSION => n)`.",
        annotations=READ_ONLY,
    )
    async def query_sql(
        ctx: Context,
        org: Org,
        super: Super,
        sql: Annotated[
            str | None, Field(description="One SELECT; omit when passing cursor")
        ] = None,
        limit: Annotated[
            int | None,
            Field(
                ge=1,
                description="Most rows per call (server default 1000); a cursor "
                "continues with the same page size",
            ),
        ] = None,
        timeout_s: Annotated[
            float | None, Field(gt=0, description="Query timeout in seconds")
        ] = None,
        as_of_version: Annotated[
            int | None, Field(description="Read that version of the one table queried")
        ] = None,
        as_of_time: Annotated[
            str | None, Field(description="ISO 8601 instant: every table as it was then")
        ] = None,
        cursor: Annotated[str | None, Field(description="next_cursor of a previous result")] = None,
    ) -> Reply:
        if cursor:
            sql, as_of_version, as_of_time, offset, limit = _resume(cursor, org, super, sql, limit)
        elif not sql:
            raise ToolError("give sql (one SELECT) or a cursor")
        else:
            offset = 0
        async with backend.call(ctx) as api:
            result = await run_query(api, org, super, {
                "sql": sql, "limit": limit, "timeout_s": timeout_s, "offset": offset,
                "as_of_version": as_of_version, "as_of_time": as_of_time,
            })  # fmt: skip
        state = {"org": org, "super": super, "sql": sql, "v": as_of_version, "t": as_of_time,
                 "offset": offset, "limit": limit}  # fmt: skip
        return answer(_rows_page(result, budget, cursor_state=state), budget)


def _resume(
    cursor: str, org: str, sup: str, sql: str | None, limit: int | None
) -> tuple[str, int | None, str | None, int, int | None]:
    """The query a query_sql cursor continues: its SQL, as_of_version, as_of_time and
    offset, and the page size (``limit`` if given, else the cursor's)."""
    state = decode_cursor(cursor, {"org": str, "super": str, "sql": str, "offset": int})
    if state.get("org") != org or state.get("super") != sup:
        raise ToolError("this cursor belongs to another org or super")
    if sql is not None and sql != state.get("sql"):
        raise ToolError("pass either sql or cursor (a cursor carries its query)")
    return (
        state["sql"],
        state.get("v"),
        state.get("t"),
        state["offset"],
        limit or state.get("limit"),
    )
