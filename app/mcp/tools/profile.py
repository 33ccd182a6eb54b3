"""The tools that look at the data itself: a sample of rows, a column's profile (with a
histogram for numbers), and a search for columns by name across the readable tables."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from app.mcp.backend import Backend
from app.mcp.budget import _page_offset, _paged, _rows_page
from app.mcp.client import ApiError, LedgerlakeApi, path
from app.mcp.tools.common import (
    READ_ONLY,
    Cursor,
    Org,
    Reply,
    Super,
    Table,
    answer,
    choose_columns,
    is_nested,
    is_numeric,
    masked_columns,
    masked_stats,
    quote,
    run_query,
    view_columns,
)

# What profile_column withholds of a masked column.
PROFILE_WITHHELD = ["null_count", "distinct_estimate", "min", "max", "mean", "stddev",
                    "top_values", "histogram"]  # fmt: skip


def register(server: MCPServer, backend: Backend) -> None:
    """Registers sample_rows, profile_column and search_columns."""
    _register_sample_rows(server, backend)
    _register_profile_column(server, backend)
    _register_search_columns(server, backend)


def _register_sample_rows(server: MCPServer, backend: Backend) -> None:
    """sample_rows."""
    budget = backend.config.token_budget

    @server.tool(
        description="A few rows of a table, to see what its values look like: a random "
        "sample by default, or the first rows. Columns your access hides are absent and "
        "masked ones are masked.",
        annotations=READ_ONLY,
    )
    async def sample_rows(
        ctx: Context,
        org: Org,
        super: Super,
        table: Table,
        n: Annotated[int, Field(ge=1, le=1000, description="How many rows")] = 10,
        columns: Annotated[
            list[str] | None, Field(description="Only these columns (default: all)")
        ] = None,
        random: Annotated[
            bool, Field(description="A random sample (true) or the first rows (false)")
        ] = True,
    ) -> Reply:
        async with backend.call(ctx) as api:
            if columns:
                chosen = choose_columns(await view_columns(api, org, super, table), columns)
                select = ", ".join(quote(c["name"]) for c in chosen)
            else:
                select = "*"
            sample = f" USING SAMPLE reservoir({n} ROWS) REPEATABLE (42)" if random else ""
            sql = f"SELECT {select} FROM {quote(table)}{sample} LIMIT {n}"
            result = await run_query(api, org, super, {"sql": sql, "limit": n})
            masked = await masked_columns(api, org, super, table)
        page = _rows_page(result, budget, cursor_state=None)
        shown = [c["name"] for c in result["columns"] if c["name"] in masked]
        if shown:  # their values are the masks, not the data
            page["masked_columns"] = {name: masked[name] for name in shown}
        return answer(page, budget)


def _register_profile_column(server: MCPServer, backend: Backend) -> None:
    """profile_column."""
    budget = backend.config.token_budget

    @server.tool(
        description="A profile of one column: row and null counts, approximate distinct "
        "count, min and max, the most frequent values with their counts, and for numbers "
        "the mean, standard deviation and an equal-width histogram. A column your "
        "policies mask gets its row count only (masked, withheld).",
        annotations=READ_ONLY,
    )
    async def profile_column(
        ctx: Context,
        org: Org,
        super: Super,
        table: Table,
        column: Annotated[str, Field(description="Column name")],
        top: Annotated[int, Field(ge=1, le=100, description="How many top values")] = 10,
        bins: Annotated[int, Field(ge=2, le=100, description="Histogram bins (numbers)")] = 10,
    ) -> Reply:
        async with backend.call(ctx) as api:
            (col,) = choose_columns(await view_columns(api, org, super, table), [column])
            q, t, numeric = quote(col["name"]), quote(table), is_numeric(col["type"])
            masked = await masked_columns(api, org, super, table)
            if col["name"] in masked:  # its row count only: the rest is of its values
                count = await run_query(api, org, super, {"sql": f"SELECT count(*) FROM {t}"})
                withheld = masked_stats(masked[col["name"]], PROFILE_WITHHELD)
                only = {"column": col["name"], "type": col["type"],
                        "row_count": count["rows"][0][0], **withheld}  # fmt: skip
                return answer(only, budget)
            exprs = ["count(*)", f"count(*) - count({q})"]
            if not is_nested(col["type"]):
                exprs += [f"approx_count_distinct({q})", f"min({q})", f"max({q})"]
            if numeric:
                exprs += [f"avg({q})::DOUBLE", f"stddev_samp({q})::DOUBLE"]
            sql = f"SELECT {', '.join(exprs)} FROM {t}"
            summary = (await run_query(api, org, super, {"sql": sql}))["rows"][0]
            profile: dict[str, Any] = {
                "column": col["name"],
                "type": col["type"],
                "row_count": summary[0],
                "null_count": summary[1],
            }
            if len(summary) > 2:
                profile.update(distinct_estimate=summary[2], min=summary[3], max=summary[4])
            if numeric:
                profile.update(mean=summary[5], stddev=summary[6])
            top_sql = (f"SELECT {q} AS value, count(*) AS count FROM {t} GROUP BY 1 "
                       f"ORDER BY 2 DESC, 1 NULLS LAST LIMIT {top}")  # fmt: skip
            tops = await run_query(api, org, super, {"sql": top_sql, "limit": top})
            profile["top_values"] = [{"value": v, "count": c} for v, c in tops["rows"]]
            low, high = profile.get("min"), profile.get("max")
            if numeric and low is not None and high is not None:
                profile["histogram"] = await _histogram(
                    lambda sql: run_query(api, org, super, {"sql": sql, "limit": bins}),
                    q, t, float(low), float(high), bins,
                )  # fmt: skip
        return answer(profile, budget)


def _register_search_columns(server: MCPServer, backend: Backend) -> None:
    """search_columns."""
    budget = backend.config.token_budget

    @server.tool(
        description="Find columns by name across every table you can read (optionally "
        "in one org or super): a case-insensitive pattern with * and ? wildcards, or a "
        "plain substring. Returns org, super, table, column and type.",
        annotations=READ_ONLY,
    )
    async def search_columns(
        ctx: Context,
        pattern: Annotated[str, Field(description="e.g. 'customer', '*_id', 'amount*'")],
        org: Annotated[str | None, Field(description="Only this org")] = None,
        super: Annotated[str | None, Field(description="Only this super (needs org)")] = None,
        type: Annotated[
            str | None, Field(description="Only columns whose type starts with this")
        ] = None,
        cursor: Cursor = None,
    ) -> Reply:
        if super and not org:
            raise ToolError("super needs org")
        scope = [pattern, org, super, type]
        offset = _page_offset(cursor, scope)
        glob = pattern.lower() if any(ch in pattern for ch in "*?[") else f"*{pattern.lower()}*"
        async with backend.call(ctx) as api:
            matches = await _search(api, glob, org, super, type)
        page = {"pattern": pattern, "total": len(matches), "matches": matches[offset:]}
        return answer(_paged(page, "matches", budget, offset, scope), budget)


async def _histogram(
    run: Callable[[str], Awaitable[dict[str, Any]]],
    q: str,
    t: str,
    low: float,
    high: float,
    bins: int,
) -> list[dict[str, Any]]:
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high == low:
        result = await run(f"SELECT count({q}) FROM {t}")
        return [{"from": low, "to": high, "count": result["rows"][0][0]}]
    width = (high - low) / bins
    sql = (f"SELECT least(floor(({q}::DOUBLE - {low!r}) / {width!r}), {bins - 1})::INTEGER "
           f"AS bin, count(*) FROM {t} WHERE {q} IS NOT NULL GROUP BY 1 ORDER BY 1")  # fmt: skip
    counts = {b: c for b, c in (await run(sql))["rows"]}
    return [{"from": low + i * width, "to": low + (i + 1) * width, "count": counts.get(i, 0)}
            for i in range(bins)]  # fmt: skip


async def _search(
    api: LedgerlakeApi, glob: str, org: str | None, sup: str | None, type_prefix: str | None
) -> list[dict[str, str]]:
    """Every column whose name matches ``glob``, in the tables the caller can read."""
    orgs = [org] if org else [o["name"] for o in (await api.get("/v1/orgs"))["orgs"]]
    tables: list[tuple[str, str, str]] = []
    for o in orgs:
        supers = [sup] if sup else [s["name"] for s in (await api.get(path(o, "supers")))["supers"]]
        for s in supers:
            listed = await api.get(path(o, s, "tables"))
            tables += [(o, s, t["name"]) for t in listed["tables"]]
    found: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    limiter = anyio.CapacityLimiter(4)

    failed: list[ApiError] = []

    async def one(o: str, s: str, t: str) -> None:
        async with limiter:
            try:
                detail = await api.get(path(o, s, "tables", t))
            except ApiError as exc:
                if exc.status not in (403, 404):  # (visible but not readable, or dropped)
                    failed.append(exc)
                return
        found[(o, s, t)] = [
            {"org": o, "super": s, "table": t, "column": c["name"], "type": c["type"]}
            | ({"masked": True} if c.get("masked") else {})
            for c in detail["columns"]
            if fnmatch.fnmatchcase(c["name"].lower(), glob)
            and (not type_prefix or c["type"].startswith(type_prefix.lower()))
        ]

    async with anyio.create_task_group() as tg:
        for key in tables:
            tg.start_soon(one, *key)
    if failed:
        raise failed[0]
    return [m for key in sorted(found) for m in found[key]]
