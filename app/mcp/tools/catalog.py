"""The catalog tools: listing orgs, supers and tables, and describing a table (schema,
stats computed now, version history) or a super."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from app.mcp.backend import Backend
from app.mcp.budget import _page_offset, _paged, _shrinking, estimate_tokens
from app.mcp.client import path
from app.mcp.tools.common import (
    READ_ONLY,
    Cursor,
    Org,
    Reply,
    Super,
    Table,
    answer,
    choose_columns,
    fetch,
    is_nested,
    masked_columns,
    masked_stats,
    quote,
    run_query,
    view_columns,
)

# What get_table_stats withholds of a masked column.
STATS_OF_A_COLUMN = ["null_count", "min", "max", "distinct_estimate"]


def register(server: MCPServer, backend: Backend) -> None:
    """Registers the catalog tools, in the order a client lists them."""
    _register_lists(server, backend)
    _register_table_detail(server, backend)
    _register_super_meta_and_history(server, backend)


def _register_lists(server: MCPServer, backend: Backend) -> None:
    """list_orgs, list_supers and list_tables."""
    budget = backend.config.token_budget

    @server.tool(
        description="The orgs (tenants) you can see, with their number of supers.",
        annotations=READ_ONLY,
    )
    async def list_orgs(ctx: Context) -> Reply:
        return await fetch(backend, ctx, "/v1/orgs")

    @server.tool(
        description="The supers (schemas of tables) of an org that you can see, with "
        "their number of tables.",
        annotations=READ_ONLY,
    )
    async def list_supers(ctx: Context, org: Org) -> Reply:
        return await fetch(backend, ctx, path(org, "supers"))

    @server.tool(
        description="The tables of a super that you can see: name, version, row count, "
        "file count, size and last update. Long lists come in pages: pass next_cursor "
        "back as cursor.",
        annotations=READ_ONLY,
    )
    async def list_tables(
        ctx: Context,
        org: Org,
        super: Super,
        cursor: Cursor = None,
    ) -> Reply:
        scope = [org, super]
        offset = _page_offset(cursor, scope)
        async with backend.call(ctx) as api:
            listed = await api.get(path(org, super, "tables"))
        tables = listed["tables"]
        page = {"org": org, "super": super, "total": len(tables), "tables": tables[offset:]}
        return answer(_paged(page, "tables", budget, offset, scope), budget)


def _register_table_detail(server: MCPServer, backend: Backend) -> None:
    """describe_table and get_table_stats."""
    budget = backend.config.token_budget

    @server.tool(
        description="A table's schema (column names, types, nullability), row count, "
        "version, files, size, per-column min/max/null counts (when your access shows "
        "them), its creation and last update, and its Delta/Iceberg mirrors. Read this "
        "before writing SQL against the table. Under row policies, what they keep from "
        "you is null and named in withheld (the row count is then the rows you may read, "
        "counted now); masked columns are flagged masked.",
        annotations=READ_ONLY,
    )
    async def describe_table(ctx: Context, org: Org, super: Super, table: Table) -> Reply:
        async with backend.call(ctx) as api:
            detail: dict[str, Any] = await api.get(path(org, super, "tables", table))
            withheld = detail.get("withheld", [])
            if "row_count" in withheld:
                # A row filter applies: the count the caller may know, through its view.
                sql = f"SELECT count(*) FROM {quote(table)}"
                counted = await run_query(api, org, super, {"sql": sql})
                detail["row_count"] = counted["rows"][0][0]
                detail["withheld"] = [w for w in withheld if w != "row_count"]
                detail["row_count_note"] = "the rows your policies let you read, counted now"
        if estimate_tokens(detail) > budget:
            detail["stats"] = {}
            detail["note"] = (
                "per-column stats were left out to fit the response budget; "
                "use get_table_stats for chosen columns"
            )
        return answer(detail, budget)

    @server.tool(
        description="Per-column statistics of a table computed now over the rows you "
        "can read: min, max, null count and an approximate distinct count (HyperLogLog), "
        "plus the row count. Scans the table; pass columns to limit the work. Columns "
        "your policies mask get no statistics (masked, withheld).",
        annotations=READ_ONLY,
    )
    async def get_table_stats(
        ctx: Context,
        org: Org,
        super: Super,
        table: Table,
        columns: Annotated[
            list[str] | None, Field(description="Only these columns (default: all)")
        ] = None,
        as_of_version: Annotated[
            int | None, Field(description="Stats of that past version of the table")
        ] = None,
    ) -> Reply:
        async with backend.call(ctx) as api:
            available = await view_columns(api, org, super, table, as_of_version)
            chosen = choose_columns(available, columns)
            masked = await masked_columns(api, org, super, table)
            plain = [c for c in chosen if c["name"] not in masked]
            sql = _stats_sql(plain, table)
            result = await run_query(api, org, super, {"sql": sql, "as_of_version": as_of_version})
        row = result["rows"][0]
        stats = _column_stats(plain, row)
        for c in chosen:
            if c["name"] in masked:
                withheld = masked_stats(masked[c["name"]], STATS_OF_A_COLUMN)
                stats[c["name"]] = {"type": c["type"], **withheld}
        ordered = {c["name"]: stats[c["name"]] for c in chosen}  # in the order asked for
        return answer({"org": org, "super": super, "table": table, "row_count": row[0],
                      "columns": ordered}, budget)  # fmt: skip


def _stats_sql(chosen: list[dict[str, str]], table: str) -> str:
    """One scan for get_table_stats: the row count, then per column its null count, min,
    max and approximate distinct count (NULLs for a nested type)."""
    exprs = ["count(*)"]
    for c in chosen:
        q = quote(c["name"])
        exprs.append(f"count(*) - count({q})")
        if is_nested(c["type"]):
            exprs += ["NULL", "NULL", "NULL"]
        else:
            exprs += [f"min({q})", f"max({q})", f"approx_count_distinct({q})"]
    return f"SELECT {', '.join(exprs)} FROM {quote(table)}"


def _column_stats(chosen: list[dict[str, str]], row: list[Any]) -> dict[str, Any]:
    """The row of ``_stats_sql``, per column."""
    stats = {}
    for i, c in enumerate(chosen):
        nulls, low, high, distinct = row[1 + 4 * i : 5 + 4 * i]
        stats[c["name"]] = {"type": c["type"], "null_count": nulls, "min": low,
                            "max": high, "distinct_estimate": distinct}  # fmt: skip
    return stats


def _register_super_meta_and_history(server: MCPServer, backend: Backend) -> None:
    """get_super_meta and table_history."""
    budget = backend.config.token_budget

    @server.tool(
        description="A super at a glance: who created it and when, its tables (those you "
        "can see) with row counts and sizes, and the totals.",
        annotations=READ_ONLY,
    )
    async def get_super_meta(ctx: Context, org: Org, super: Super, cursor: Cursor = None) -> Reply:
        scope = [org, super]
        offset = _page_offset(cursor, scope)
        async with backend.call(ctx) as api:
            meta = await api.get(path(org, super, "meta"))
        meta["tables"] = meta["tables"][offset:]
        return answer(_paged(meta, "tables", budget, offset, scope), budget)

    @server.tool(
        description="A table's version history, oldest first: per version the event "
        "type, who did it and when, rows added and removed, and columns added. Use "
        "as_of_version in query_sql to read a past version.",
        annotations=READ_ONLY,
    )
    async def table_history(
        ctx: Context,
        org: Org,
        super: Super,
        table: Table,
        after: Annotated[str | None, Field(description="next_after of a previous page")] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="Most versions to return")] = 100,
    ) -> Reply:
        async with backend.call(ctx) as api:
            page = await _shrinking(
                lambda n: api.get(
                    path(org, super, "tables", table, "history"), after=after, limit=n
                ),
                "entries",
                limit,
                budget,
            )
        return answer(page, budget)
