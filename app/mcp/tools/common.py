"""What the tool modules share: the reply format, the parameter types described for the
model, SQL quoting, column choice, and the calls of the API that several tools make."""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from app.mcp.backend import Backend
from app.mcp.budget import within_budget
from app.mcp.client import LedgerlakeApi, path

# A query gets the call's remaining time less this, for the API's answer to come back.
QUERY_MARGIN_S = 0.5

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)


Reply = Annotated[CallToolResult, dict[str, Any]]
"""What a tool returns: the result as structured content, and as compact JSON text (the
SDK's default text is indented, about twice the tokens the budget counts)."""


def reply(result: dict[str, Any]) -> CallToolResult:
    text = json.dumps(result, default=str, separators=(",", ":"), ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result)


def quote(name: str) -> str:
    """A SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


NESTED_PREFIXES = ("list", "large_list", "struct", "map")
NUMERIC_PREFIXES = ("int", "uint", "float", "double", "decimal")


def is_nested(type_name: str) -> bool:
    return type_name.startswith(NESTED_PREFIXES)


def is_numeric(type_name: str) -> bool:
    return type_name.startswith(NUMERIC_PREFIXES)


# Parameter types, described for the model.
Org = Annotated[str, Field(description="Org (tenant) name, from list_orgs")]
Super = Annotated[str, Field(description="Super (schema of tables) name, from list_supers")]
Table = Annotated[str, Field(description="Table name, from list_tables")]
Cursor = Annotated[str | None, Field(description="next_cursor of a previous page, as is")]


def choose_columns(
    available: list[dict[str, str]], wanted: list[str] | None
) -> list[dict[str, str]]:
    """The columns named in ``wanted`` (all when None), from the caller's view."""
    if not wanted:
        return available
    by_name = {c["name"]: c for c in available}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise ToolError(
            f"no column {', '.join(map(repr, missing))} in this table "
            f"(columns: {', '.join(by_name) or 'none'})"
        )
    return [by_name[w] for w in wanted]


def answer(result: dict[str, Any], budget: int) -> CallToolResult:
    """A tool's reply: ``result`` within the response budget."""
    return reply(within_budget(result, budget))


async def fetch(backend: Backend, ctx: Context, url: str) -> CallToolResult:
    """A tool that is one GET of the API, as it answers."""
    async with backend.call(ctx) as api:
        return answer(await api.get(url), backend.config.token_budget)


async def run_query(api: LedgerlakeApi, org: str, sup: str, body: dict[str, Any]) -> dict[str, Any]:
    """A query through the API, with at most what is left of the call's time (less
    a margin for the round trip), so the API's own timeout answers first."""
    body = {k: v for k, v in body.items() if v is not None}
    if api.deadline is not None:
        left = api.deadline - anyio.current_time() - QUERY_MARGIN_S
        if left < 0.1:
            raise TimeoutError
        body["timeout_s"] = round(min(body.get("timeout_s", left), left), 1)
    result: dict[str, Any] = await api.post(path(org, sup, "query"), body)
    return result


async def view_columns(
    api: LedgerlakeApi, org: str, sup: str, table: str, as_of_version: int | None = None
) -> list[dict[str, str]]:
    """The columns the caller's view of the table has (policies applied)."""
    plan = await api.post(
        path(org, sup, "query", "validate"),
        {"sql": f"SELECT * FROM {quote(table)}", "as_of_version": as_of_version},
    )
    columns: list[dict[str, str]] = plan["columns"]
    return columns


MASKED_NOTE = (
    "this column is masked by your policies: its statistics and values are withheld "
    "(its values read as its mask)"
)


async def masked_columns(api: LedgerlakeApi, org: str, sup: str, table: str) -> dict[str, str]:
    """The columns of the table the caller's policies mask (name -> mask), as the
    table's detail flags them; their statistics are withheld by every tool."""
    detail = await api.get(path(org, sup, "tables", table))
    return {c["name"]: c.get("mask", "") for c in detail["columns"] if c.get("masked")}


def masked_stats(mask: str, withheld: list[str]) -> dict[str, Any]:
    """What a tool says of a masked column's statistics instead of them."""
    return {"masked": True, "mask": mask, "withheld": withheld, "note": MASKED_NOTE}
