"""The MCP server: catalog and query tools for LLM clients (official ``mcp`` SDK).

Every tool is a client of Ledgerlake's HTTP API with the caller's own bearer token
(``app/mcp/client.py``): inside ``serve`` through the app in process, for ``ledgerlake
mcp`` through a running server. Authentication, tenancy, grants, row-level security,
query limits, rate limits and the audit are therefore the API's, with no second
implementation to drift. This module adds what is particular to LLM clients: tool
descriptions, a response budget in estimated tokens, per-principal and overall
concurrency limits, a per-call timeout, and errors as tool errors.

Transports: stdio (``ledgerlake mcp``) and streamable HTTP, stateless and with JSON
responses, so any API pod can answer any request (no sticky sessions)."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import logging
import math
import re
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from app.mcp.client import ApiError, LedgerlakeApi, path
from app.settings import Settings, package_version

log = logging.getLogger("ledgerlake.mcp")

PRM_PATH = "/.well-known/oauth-protected-resource/mcp"
"""Where the MCP endpoint's OAuth Protected Resource Metadata (RFC 9728) is served: the
well-known path with the resource's path inserted, and the root form some clients try."""
METADATA_PATHS = (PRM_PATH, "/.well-known/oauth-protected-resource")

# A query gets the call's remaining time less this, for the API's answer to come back.
QUERY_MARGIN_S = 0.5

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)

INSTRUCTIONS = """\
Ledgerlake is a data catalog and SQL warehouse. Data is organised as org -> super (a
schema of tables) -> table. Start with list_orgs, list_supers and list_tables (or
search_columns), read describe_table before writing SQL, and prefer aggregates, LIMIT
and explicit column lists: results are capped to a token budget. SQL is DuckDB's
dialect, read-only (one SELECT), and names tables of one super by their bare names.
You only see what your credential is granted; a name you cannot see does not exist."""


@dataclass(frozen=True)
class McpConfig:
    token_budget: int = 25_000
    timeout_s: float = 60.0
    max_concurrent: int = 32
    max_concurrent_per_principal: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> McpConfig:
        return cls(
            token_budget=settings.mcp_token_budget,
            timeout_s=settings.mcp_timeout_s,
            max_concurrent=settings.mcp_max_concurrent,
            max_concurrent_per_principal=settings.mcp_max_concurrent_per_principal,
        )


def estimate_tokens(value: Any) -> int:
    """A result's size in tokens, estimated as its compact JSON length / 4 (what most
    tokenizers average on JSON of mixed names and numbers)."""
    text = json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return math.ceil(len(text) / 4)


def fit(payload: dict[str, Any], key: str, budget: int) -> int:
    """How many leading items of ``payload[key]`` fit in ``budget`` tokens with the rest
    of the payload (a binary search; 0 if even one does not)."""
    items = payload[key]
    if estimate_tokens(payload) <= budget:
        return len(items)
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens({**payload, key: items[:mid]}) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut_strings(value: Any, longest: int) -> Any:
    if isinstance(value, str) and len(value) > longest:
        return value[:longest] + "…[cut]"
    if isinstance(value, dict):  # (a cursor must stay whole)
        return {k: v if k == "next_cursor" else _cut_strings(v, longest) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut_strings(v, longest) for v in value]
    return value


def _longest_string(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max((_longest_string(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_longest_string(v) for v in value), default=0)
    return 0


def within_budget(result: dict[str, Any], budget: int) -> dict[str, Any]:
    """The last guard of every answer: one over the budget (a tool's own paging left it
    too large, e.g. long text values) gets its long strings cut, as little as needed;
    if that is not enough, a tool error saying how to narrow the call."""
    if estimate_tokens(result) <= budget:
        return result
    lo, hi = 0, _longest_string(result)
    while lo < hi:  # the longest strings may be and still fit
        mid = (lo + hi + 1) // 2
        if estimate_tokens(_cut_strings(result, mid)) <= budget - 60:
            lo = mid
        else:
            hi = mid - 1
    if lo < 20:
        raise ToolError(
            f"this answer is about {estimate_tokens(result):,} tokens, more than the response "
            f"budget of {budget:,}; narrow the call: fewer columns, a filter, a LIMIT, or "
            "one table at a time"
        )
    cut: dict[str, Any] = _cut_strings(result, lo)
    note = f"values longer than {lo} characters were cut to fit the response budget"
    cut["note"] = f"{cut['note']} {note}" if isinstance(cut.get("note"), str) else note
    return cut


class CallLimiter:
    """Tool calls running at once, overall and per principal. A call past a limit is
    refused at once (a tool error the model can act on), not queued behind others."""

    def __init__(self, total: int, per_principal: int) -> None:
        self.total, self.per_principal = total, per_principal
        self.running = 0
        self.by_principal: Counter[str] = Counter()

    @asynccontextmanager
    async def slot(self, principal: str) -> AsyncIterator[None]:
        # No await between the checks and the counts: atomic on the event loop.
        if self.running >= self.total:
            raise ToolError(
                f"the server is running its limit of {self.total} MCP tool calls; "
                "try again in a moment"
            )
        if self.by_principal[principal] >= self.per_principal:
            raise ToolError(
                f"you already have {self.per_principal} tool calls running (the limit per "
                "principal); wait for one to finish, then try again"
            )
        self.running += 1
        self.by_principal[principal] += 1
        try:
            yield
        finally:
            self.running -= 1
            self.by_principal[principal] -= 1
            if not self.by_principal[principal]:
                del self.by_principal[principal]


def _digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()


@dataclass
class Backend:
    """How the tools reach the API: a shared HTTP client (in process or remote) and
    where a call's credential comes from (the HTTP request's ``Authorization``, or the
    fixed token of a stdio server)."""

    config: McpConfig
    client: httpx.AsyncClient | None = None
    token: str | None = None
    limiter: CallLimiter = field(init=False)
    # Which principal a credential is (filled by the HTTP gate, which asks the API).
    # Only the concurrency limit keys on it; every call is authorised by the API.
    principals: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.limiter = CallLimiter(
            self.config.max_concurrent, self.config.max_concurrent_per_principal
        )

    def api(self, authorization: str) -> LedgerlakeApi:
        if self.client is None:
            raise ToolError("the MCP server is not running")
        return LedgerlakeApi(self.client, authorization)

    def remember(self, authorization: str, principal_id: str) -> None:
        key = _digest(authorization)
        self.principals[key] = principal_id
        self.principals.move_to_end(key)
        while len(self.principals) > 10_000:
            self.principals.popitem(last=False)

    def authorization(self, ctx: Context) -> str:
        headers = ctx.headers
        if headers is not None:  # HTTP: the caller's own credential
            value = headers.get("authorization", "")
            if value:
                return value
            raise ToolError("this request carries no Authorization header")
        if self.token:
            return f"Bearer {self.token}"
        raise ToolError("no Ledgerlake token is configured (set LEDGERLAKE_TOKEN)")

    @asynccontextmanager
    async def call(self, ctx: Context) -> AsyncIterator[LedgerlakeApi]:
        """One tool call: its concurrency slot, its timeout, and API refusals turned
        into tool errors with the API's code and message."""
        authorization = self.authorization(ctx)
        digest = _digest(authorization)
        principal = self.principals.get(digest, digest)
        async with self.limiter.slot(principal):
            try:
                with anyio.fail_after(self.config.timeout_s):
                    api = self.api(authorization)
                    api.deadline = anyio.current_time() + self.config.timeout_s
                    yield api
            except TimeoutError:
                raise ToolError(
                    f"the call took longer than {self.config.timeout_s:g}s and was stopped; "
                    "narrow it (filters, LIMIT, fewer columns, one table at a time)"
                ) from None
            except ApiError as exc:
                raise ToolError(describe_error(exc)) from None


_ERROR_HINTS = {
    401: "the credential was refused (missing, expired or revoked)",
    403: "you can see this object but are not allowed to do this",
    404: "it does not exist, or you have no access to it",
    408: "the query hit its timeout (at most the MCP call's); narrow it",
    410: "that version has expired",
    429: "too many requests; wait a moment",
}


def describe_error(exc: ApiError) -> str:
    hint = _ERROR_HINTS.get(exc.status)
    text = f"{exc.code}: {exc.message}"
    return f"{text} ({hint})" if hint and hint not in text else text


# Cursors are opaque to the model: base64 of a small JSON object.
MAX_CURSOR_CHARS = 200_000
# Characters kept free for a truncation note (the longest note is about 450).
NOTE_RESERVE = 600


def encode_cursor(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode()


def decode_cursor(cursor: str, fields: dict[str, type] | None = None) -> dict[str, Any]:
    """The state of a cursor, which must have ``fields`` with their types (a cursor of
    another tool, or an edited one, is refused)."""
    refused = ToolError("this cursor is not one this tool returned; use its next_cursor as is")
    if len(cursor) > MAX_CURSOR_CHARS:
        raise refused
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, binascii.Error, RecursionError):
        raise refused from None
    if not isinstance(state, dict):
        raise refused
    for name, kind in (fields or {}).items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or value == "":
            raise refused
    return state


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


def _is_nested(type_name: str) -> bool:
    return type_name.startswith(NESTED_PREFIXES)


def _is_numeric(type_name: str) -> bool:
    return type_name.startswith(NUMERIC_PREFIXES)


# Parameter types, described for the model.
Org = Annotated[str, Field(description="Org (tenant) name, from list_orgs")]
Super = Annotated[str, Field(description="Super (schema of tables) name, from list_supers")]
Table = Annotated[str, Field(description="Table name, from list_tables")]
Cursor = Annotated[str | None, Field(description="next_cursor of a previous page, as is")]


def build_server(backend: Backend) -> MCPServer:
    """The MCP server with every Ledgerlake tool, resource and prompt."""
    mcp = MCPServer(name="ledgerlake", version=package_version(), instructions=INSTRUCTIONS)
    budget = backend.config.token_budget

    def answer(result: dict[str, Any]) -> CallToolResult:
        return reply(within_budget(result, budget))

    async def run_query(
        api: LedgerlakeApi, org: str, sup: str, body: dict[str, Any]
    ) -> dict[str, Any]:
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

    async def fetch(ctx: Context, url: str) -> CallToolResult:
        """A tool that is one GET of the API, as it answers."""
        async with backend.call(ctx) as api:
            return answer(await api.get(url))

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

    @mcp.tool(
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
                return answer({"status": "unavailable", "detail": exc.message})
            return answer(result)

    @mcp.tool(
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
        return answer(service)

    @mcp.tool(
        description="Who you are to Ledgerlake: your principal (name, org, attributes), "
        "the token you use and your grants (role on an org, super or table).",
        annotations=READ_ONLY,
    )
    async def whoami(ctx: Context) -> Reply:
        return await fetch(ctx, "/v1/whoami")

    @mcp.tool(
        description="The orgs (tenants) you can see, with their number of supers.",
        annotations=READ_ONLY,
    )
    async def list_orgs(ctx: Context) -> Reply:
        return await fetch(ctx, "/v1/orgs")

    @mcp.tool(
        description="The supers (schemas of tables) of an org that you can see, with "
        "their number of tables.",
        annotations=READ_ONLY,
    )
    async def list_supers(ctx: Context, org: Org) -> Reply:
        return await fetch(ctx, path(org, "supers"))

    @mcp.tool(
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
        return answer(_paged(page, "tables", budget, offset, scope))

    @mcp.tool(
        description="A table's schema (column names, types, nullability), row count, "
        "version, files, size, per-column min/max/null counts (when your access shows "
        "them), its creation and last update, and its Delta/Iceberg mirrors. Read this "
        "before writing SQL against the table.",
        annotations=READ_ONLY,
    )
    async def describe_table(ctx: Context, org: Org, super: Super, table: Table) -> Reply:
        async with backend.call(ctx) as api:
            detail: dict[str, Any] = await api.get(path(org, super, "tables", table))
        if estimate_tokens(detail) > budget:
            detail["stats"] = {}
            detail["note"] = (
                "per-column stats were left out to fit the response budget; "
                "use get_table_stats for chosen columns"
            )
        return answer(detail)

    @mcp.tool(
        description="Per-column statistics of a table computed now over the rows you "
        "can read: min, max, null count and an approximate distinct count (HyperLogLog), "
        "plus the row count. Scans the table; pass columns to limit the work.",
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
            chosen = _choose(available, columns)
            exprs = ["count(*)"]
            for c in chosen:
                q = quote(c["name"])
                exprs.append(f"count(*) - count({q})")
                if _is_nested(c["type"]):
                    exprs += ["NULL", "NULL", "NULL"]
                else:
                    exprs += [f"min({q})", f"max({q})", f"approx_count_distinct({q})"]
            sql = f"SELECT {', '.join(exprs)} FROM {quote(table)}"
            result = await run_query(api, org, super, {"sql": sql, "as_of_version": as_of_version})
        row = result["rows"][0]
        stats = {}
        for i, c in enumerate(chosen):
            nulls, low, high, distinct = row[1 + 4 * i : 5 + 4 * i]
            stats[c["name"]] = {"type": c["type"], "null_count": nulls, "min": low,
                                "max": high, "distinct_estimate": distinct}  # fmt: skip
        return answer({"org": org, "super": super, "table": table, "row_count": row[0],
                      "columns": stats})  # fmt: skip

    @mcp.tool(
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
        return answer(_paged(meta, "tables", budget, offset, scope))

    @mcp.tool(
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
        return answer(page)

    @mcp.tool(
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
                chosen = _choose(await view_columns(api, org, super, table), columns)
                select = ", ".join(quote(c["name"]) for c in chosen)
            else:
                select = "*"
            sample = f" USING SAMPLE reservoir({n} ROWS) REPEATABLE (42)" if random else ""
            sql = f"SELECT {select} FROM {quote(table)}{sample} LIMIT {n}"
            result = await run_query(api, org, super, {"sql": sql, "limit": n})
        return answer(_rows_page(result, budget, cursor_state=None))

    @mcp.tool(
        description="A profile of one column: row and null counts, approximate distinct "
        "count, min and max, the most frequent values with their counts, and for numbers "
        "the mean, standard deviation and an equal-width histogram.",
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
            (col,) = _choose(await view_columns(api, org, super, table), [column])
            q, t, numeric = quote(col["name"]), quote(table), _is_numeric(col["type"])
            exprs = ["count(*)", f"count(*) - count({q})"]
            if not _is_nested(col["type"]):
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
        return answer(profile)

    @mcp.tool(
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
        return answer(_paged(page, "matches", budget, offset, scope))

    @mcp.tool(
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
                return answer({"valid": False, "error": {"code": exc.code, "message": exc.message}})
        if estimate_tokens(plan) > budget:
            plan["plan"] = plan["plan"][: budget * 2] + "\n... (plan cut to fit the budget)"
        return answer(plan)

    @mcp.tool(
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
            state = decode_cursor(cursor, {"org": str, "super": str, "sql": str, "offset": int})
            if state.get("org") != org or state.get("super") != super:
                raise ToolError("this cursor belongs to another org or super")
            if sql is not None and sql != state.get("sql"):
                raise ToolError("pass either sql or cursor (a cursor carries its query)")
            sql, as_of_version, as_of_time = state["sql"], state.get("v"), state.get("t")
            offset, limit = state["offset"], limit or state.get("limit")
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
        return answer(_rows_page(result, budget, cursor_state=state))

    @mcp.tool(
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
        return answer(page)

    @mcp.resource(
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

    @mcp.prompt(
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

    @mcp.prompt(description="Answer a question with SQL over a super, checking the query first.")
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

    return mcp


def _choose(available: list[dict[str, str]], wanted: list[str] | None) -> list[dict[str, str]]:
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


def _paged(
    page: dict[str, Any], key: str, budget: int, offset: int, scope: list[Any] | None = None
) -> dict[str, Any]:
    """``page`` with as many items of ``page[key]`` as fit the budget; when cut, a note
    and ``next_cursor`` (an offset into the full list, and the ``scope`` of the call it
    belongs to). At least one item is shown, so that following the cursors ends."""
    items = page[key]
    state = {"offset": offset + len(items), "scope": scope or []}
    cursor = encode_cursor(state)  # the longest one
    reserve = {"truncated": True, "note": "x" * NOTE_RESERVE, "next_cursor": cursor}
    keep = max(1, fit({**page, **reserve}, key, budget))
    if keep >= len(items):
        return {**page, "truncated": False}
    return {
        **page,
        key: items[:keep],
        "truncated": True,
        "note": f"showing {keep} of {len(items)} {key} to fit the response budget of "
        f"{budget} tokens; call again with cursor=next_cursor for the rest",
        "next_cursor": encode_cursor({**state, "offset": offset + keep}),
    }


def _page_offset(cursor: str | None, scope: list[Any]) -> int:
    """Where a list continues: the offset of ``cursor``, which must be one of a call
    with the same arguments (``scope``)."""
    if not cursor:
        return 0
    state = decode_cursor(cursor, {"offset": int, "scope": list})
    if state["scope"] != scope:
        raise ToolError("this cursor belongs to a call with other arguments")
    offset: int = state["offset"]
    return offset


async def _shrinking(
    fetch: Callable[[int], Awaitable[Any]], key: str, limit: int, budget: int
) -> dict[str, Any]:
    """A page from an API with its own cursor: asked again with half the limit until it
    fits the budget (so the API's cursor stays exact)."""
    while True:
        page: dict[str, Any] = await fetch(limit)
        if estimate_tokens(page) <= budget or limit == 1:
            break
        limit = max(1, limit // 2)
    if estimate_tokens(page) > budget:
        raise ToolError(f"a single entry is larger than the response budget of {budget} tokens")
    page["limit"] = limit
    return page


def _rows_page(
    result: dict[str, Any], budget: int, cursor_state: dict[str, Any] | None
) -> dict[str, Any]:
    """A query result for the model: columns, rows as arrays, and, when the rows were
    cut (by the budget or the query's limit), ``truncated``, a note saying exactly how
    and a ``next_cursor`` that continues after the last row returned."""
    rows = result["rows"]
    page = {"columns": result["columns"], "rows": rows, "row_count": len(rows),
            "truncated": False, "elapsed_ms": result.get("elapsed_ms")}  # fmt: skip
    if not result["truncated"] and estimate_tokens(page) <= budget:
        return page  # all of it: no note, no cursor to make room for
    # Room for the note and the cursor (which carries the SQL): the longest they can be.
    cursor = ""
    if cursor_state is not None:
        cursor = encode_cursor({**cursor_state, "offset": cursor_state["offset"] + len(rows)})
    reserve = {"truncated": True, "note": "x" * NOTE_RESERVE, "next_cursor": cursor}
    keep = fit({**page, **reserve}, "rows", budget)
    cut_by_budget = keep < len(rows)
    if not cut_by_budget and not result["truncated"]:
        return page
    page.update(rows=rows[:keep], row_count=keep, truncated=True)
    if cut_by_budget:
        why = (f"cut to {keep} of {len(rows)} rows to fit the response budget of {budget} "
               "tokens")  # fmt: skip
        if keep == 0:
            why += " (a single row is larger than the budget)"
    else:
        why = (f"the query has more rows than the {len(rows)} returned (its limit, or the "
               "server's cap on a result's size)")  # fmt: skip
    hint = ("Narrow it instead: aggregate, add a LIMIT or WHERE, or select fewer "
            "(or shorter: substr) columns.")  # fmt: skip
    if cursor_state is not None and keep > 0:
        page["next_cursor"] = encode_cursor(
            {**cursor_state, "offset": cursor_state["offset"] + keep}
        )
        hint = ("Pass next_cursor as cursor (no sql) for the next rows (the same query "
                "runs again with an offset: add ORDER BY for a stable order, and "
                "as_of_version/as_of_time for a fixed snapshot). ") + hint  # fmt: skip
    page["note"] = f"Result truncated: {why}. {hint}"
    return page


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


# ---- HTTP: the bearer gate and the RFC 9728 metadata ---------------------------------


_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def base_url(scope: Scope, public_url: str | None) -> str:
    """The service's external base URL: ``LEDGERLAKE_PUBLIC_URL``, else the request's
    scheme and Host (forwarded headers are not trusted: behind a proxy, set the
    setting), a Host that is not a plain host name counting as ``localhost``."""
    if public_url:
        return public_url.rstrip("/")
    headers = dict(scope.get("headers") or [])
    host = headers.get(b"host", b"").decode("latin-1")
    if not _HOST.match(host):
        host = "localhost"
    return f"{scope.get('scheme', 'http')}://{host}"


def protected_resource_metadata(base: str, settings: Settings) -> dict[str, Any]:
    """RFC 9728 metadata of the MCP endpoint: the resource, how to present a token and
    the authorization servers that issue them (``LEDGERLAKE_MCP_AUTHORIZATION_SERVERS``,
    else the JWT issuer; none when only Ledgerlake API tokens are used)."""
    servers = [s.strip() for s in settings.mcp_authorization_servers.split(",") if s.strip()]
    if not servers and settings.jwt_issuer:
        servers = [settings.jwt_issuer]
    doc: dict[str, Any] = {
        "resource": f"{base}/mcp",
        "bearer_methods_supported": ["header"],
        "resource_name": "Ledgerlake",
    }
    if servers:
        doc["authorization_servers"] = servers
    if settings.jwt_required_scopes.split():
        doc["scopes_supported"] = settings.jwt_required_scopes.split()
    return doc


class BearerGate:
    """In front of the MCP endpoint: a request without a credential the API accepts
    gets 401 with ``WWW-Authenticate: Bearer resource_metadata=...`` (how MCP clients
    discover the authorization server). The API itself checks each tool call again."""

    def __init__(self, app: ASGIApp, backend: Backend, public_url: str | None) -> None:
        self.app, self.backend, self.public_url = app, backend, public_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/.well-known/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET":
            # No server-initiated messages in stateless operation: no SSE stream to open
            # (the spec's answer for that is 405).
            await send_json(send, 405, {"error": {"code": "method_not_allowed",
                                                  "message": "POST JSON-RPC to this endpoint"}},
                            [(b"allow", b"POST, DELETE")])  # fmt: skip
            return
        values = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(values) > 1:  # the gate and the tools must see the same one
            await self._refuse(scope, send, 400, "invalid_request",
                               "send one Authorization header", invalid=False)  # fmt: skip
            return
        authorization = values[0].decode("latin-1") if values else ""
        if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            await self._refuse(scope, send, 401, "unauthorized",
                               "send Authorization: Bearer <token>", invalid=False)  # fmt: skip
            return
        try:
            who = await self.backend.api(authorization).get("/v1/whoami")
        except ApiError as exc:
            if exc.status == 401:
                await self._refuse(scope, send, 401, exc.code, exc.message, invalid=True)
            elif exc.status == 429:
                await self._refuse(scope, send, 429, exc.code, exc.message, invalid=False)
            else:
                await self._refuse(scope, send, 503, exc.code, exc.message, invalid=False)
            return
        self.backend.remember(authorization, who["principal"]["id"])
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, send: Send, status: int, code: str, message: str, *, invalid: bool
    ) -> None:
        headers = []
        if status == 401:
            metadata = base_url(scope, self.public_url) + PRM_PATH
            challenge = f'Bearer realm="ledgerlake", resource_metadata="{metadata}"'
            if invalid:
                challenge += ', error="invalid_token"'
            headers.append((b"www-authenticate", challenge.encode()))
        await send_json(send, status, {"error": {"code": code, "message": message}}, headers)


async def send_json(
    send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(doc).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


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
