"""The MCP server's pure logic: the response budget in estimated tokens (``fit``,
``within_budget``, paging of lists and query results), cursors, the concurrency limiter
and the text of API refusals. No I/O: the tools and the backend build on it."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError

from app.mcp.client import ApiError


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


# ---- paging: lists and query results cut to the budget, continued by a cursor --------


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
