"""Pure logic of the MCP server (app/mcp/server.py): the token budget (estimate_tokens,
fit, _paged, _rows_page), cursors, the concurrency limiter, error texts, SQL quoting,
column choice and the RFC 9728 metadata. No Redis, no sockets."""

from __future__ import annotations

import base64
import json
import math
import random
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import duckdb
import pytest
from anyio.abc import TaskStatus
from mcp.server.mcpserver.exceptions import ToolError

from app.mcp.budget import (
    CallLimiter,
    _page_offset,
    _paged,
    _rows_page,
    decode_cursor,
    describe_error,
    encode_cursor,
    estimate_tokens,
    fit,
    within_budget,
)
from app.mcp.client import ApiError
from app.mcp.gate import base_url, protected_resource_metadata
from app.mcp.tools.common import choose_columns, quote, reply
from app.settings import Settings

# ---- helpers --------------------------------------------------------------------------


def compact_len(value: Any) -> int:
    """Characters of ``value`` as compact JSON, computed here independently."""
    return len(json.dumps(value, default=str, separators=(",", ":")))


def random_items(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Items of varied sizes (short and long strings, numbers, nested lists)."""
    return [
        {
            "name": f"t{i}_" + "x" * rng.randint(0, 300),
            "rows": rng.randint(0, 10**9),
            "tags": [rng.random() for _ in range(rng.randint(0, 5))],
        }
        for i in range(n)
    ]


def random_rows(rng: random.Random, n: int, width: int = 3) -> list[list[Any]]:
    return [
        [i, "v" * rng.randint(0, 400), *[rng.random() for _ in range(width - 2)]] for i in range(n)
    ]


def query_result(rows: list[list[Any]], truncated: bool = False) -> dict[str, Any]:
    """A result as the API's query endpoint returns it."""
    return {
        "columns": [{"name": "id", "type": "int64"}, {"name": "s", "type": "string"},
                    {"name": "f", "type": "double"}],
        "rows": rows,
        "truncated": truncated,
        "elapsed_ms": 12.5,
    }  # fmt: skip


def cursor_state(sql: str = "SELECT * FROM t", **extra: Any) -> dict[str, Any]:
    """The state query_sql hands to _rows_page."""
    state = {"org": "acme", "super": "sales", "sql": sql, "v": None, "t": None,
             "offset": 0, "limit": None}  # fmt: skip
    state.update(extra)
    return state


PAGE_CURSOR_FIELDS: dict[str, type] = {"offset": int, "scope": list}
"""What the list tools require of a cursor."""

QUERY_CURSOR_FIELDS: dict[str, type] = {"org": str, "super": str, "sql": str, "offset": int}
"""What query_sql requires of a cursor."""


# ---- estimate_tokens ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "chars"),
    [
        ("", 2),  # ""
        ({}, 2),  # {}
        ("x" * 6, 8),  # exactly 2 tokens
        ("x" * 7, 9),  # 9 / 4 rounds up to 3
        (list(range(10)), 21),  # [0,1,...,9] without spaces (30 with them)
        ({"a": 1, "b": [True, None]}, len('{"a":1,"b":[true,null]}')),
    ],
)
def test_estimate_tokens_is_compact_json_length_over_four_rounded_up(
    value: Any, chars: int
) -> None:
    assert estimate_tokens(value) == math.ceil(chars / 4)


def test_estimate_tokens_counts_compact_not_indented_json() -> None:
    value = {"k": list(range(50))}
    spaced = len(json.dumps(value))  # with ", " and ": "
    assert estimate_tokens(value) < math.ceil(spaced / 4)
    assert estimate_tokens(value) == math.ceil(compact_len(value) / 4)


def test_estimate_tokens_accepts_values_json_cannot_encode() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    value = {"when": when, "amount": Decimal("12.50")}
    expected = len('{"when":"' + str(when) + '","amount":"12.50"}')
    assert estimate_tokens(value) == math.ceil(expected / 4)


def test_estimate_tokens_never_undercounts_the_reply_text() -> None:
    """The budget counts what the model receives: the reply's compact text."""
    rng = random.Random(7)
    values: list[dict[str, Any]] = [
        {"s": "é" * 50, "n": 1},
        {"rows": random_rows(rng, 20)},
        {"t": ["日本語" * 9]},
    ]
    for value in values:
        text = reply(value).content[0].text  # type: ignore[union-attr]
        assert estimate_tokens(value) >= math.ceil(len(text) / 4)


def test_estimate_tokens_grows_with_content() -> None:
    assert estimate_tokens({"a": "x" * 4000}) > estimate_tokens({"a": "x" * 40}) + 900


# ---- fit ------------------------------------------------------------------------------


def brute_force_fit(payload: dict[str, Any], key: str, budget: int) -> int:
    """The largest n whose leading n items fit, by trying every n (the reference)."""
    items = payload[key]
    best = 0
    for n in range(len(items) + 1):
        if compact_len({**payload, key: items[:n]}) <= budget * 4:
            best = n
    return best


@pytest.mark.parametrize("seed", range(12))
def test_fit_is_maximal(seed: int) -> None:
    rng = random.Random(seed)
    items = random_items(rng, rng.randint(1, 80))
    payload = {"org": "o", "total": len(items), "tables": items}
    full = estimate_tokens(payload)
    for budget in {5, 20, 50, 100, 400, full // 3, full // 2, full - 1, full, full + 10}:
        n = fit(payload, "tables", budget)
        assert 0 <= n <= len(items)
        if n:
            assert estimate_tokens({**payload, "tables": items[:n]}) <= budget
        if n < len(items):
            assert estimate_tokens({**payload, "tables": items[: n + 1]}) > budget
        assert n == brute_force_fit(payload, "tables", budget), budget


def test_fit_all_items_when_the_whole_payload_fits() -> None:
    payload = {"k": [{"a": i} for i in range(30)]}
    assert fit(payload, "k", estimate_tokens(payload)) == 30
    assert fit(payload, "k", estimate_tokens(payload) - 1) == 29


def test_fit_counts_the_rest_of_the_payload() -> None:
    items = ["x" * 36 for _ in range(10)]  # 39 characters each with the comma
    alone = fit({"k": items}, "k", 60)
    with_extra = fit({"k": items, "other": "y" * 120}, "k", 60)
    assert alone > with_extra
    assert with_extra == alone - 3  # 120 extra characters are 3 items' worth


def test_fit_empty_list() -> None:
    assert fit({"k": []}, "k", 100) == 0
    # Even when the empty payload alone is over the budget: nothing to keep.
    assert fit({"k": [], "note": "x" * 1000}, "k", 10) == 0


def test_fit_single_item_larger_than_budget() -> None:
    assert fit({"k": ["x" * 2000]}, "k", 100) == 0
    assert fit({"k": ["x" * 2000, "y"]}, "k", 100) == 0  # the first does not fit


def test_fit_does_not_change_the_payload() -> None:
    items = [{"a": "x" * 50} for _ in range(20)]
    payload = {"k": items}
    fit(payload, "k", 30)
    assert payload["k"] is items and len(items) == 20


# ---- within_budget --------------------------------------------------------------------


def test_within_budget_leaves_a_fitting_answer_alone() -> None:
    answer = {"a": "x" * 3000, "note": "n"}
    assert within_budget(answer, estimate_tokens(answer)) is answer


def test_within_budget_cuts_long_strings_as_little_as_needed() -> None:
    text = "lorem ipsum " * 2000  # 24,000 characters
    answer = {"table": "t", "columns": ["id", "body"],
              "rows": [[1, text], [2, "short"], [3, text[:9000]]]}  # fmt: skip
    budget = 4000
    out = within_budget(answer, budget)
    assert estimate_tokens(out) <= budget
    assert estimate_tokens(out) > budget * 0.9  # not cut more than needed
    (_, long1), (_, short), (_, long3) = out["rows"]
    assert short == "short" and out["table"] == "t" and out["columns"] == ["id", "body"]
    for cut, original in ((long1, text), (long3, text[:9000])):
        assert cut.endswith("[cut]")
        kept = cut[: cut.index("…[cut]")]
        assert original.startswith(kept) and 20 <= len(kept) < len(original)
    assert long1 == long3  # one length for every long string
    limit = len(long1[: long1.index("…[cut]")])
    assert f"longer than {limit} characters" in out["note"]
    assert answer["rows"][0][1] == text  # the answer itself is not changed


def test_within_budget_keeps_an_earlier_note() -> None:
    answer = {"rows": [["y" * 20_000]], "note": "Result truncated: something."}
    out = within_budget(answer, 1000)
    assert out["note"].startswith("Result truncated: something. ")
    assert "cut" in out["note"][len("Result truncated: something. ") :]
    assert estimate_tokens(out) <= 1000


def test_within_budget_refuses_what_cutting_strings_cannot_fix() -> None:
    answer = {"columns": [{"name": f"c{i}", "type": "int64"} for i in range(3000)]}
    assert estimate_tokens(answer) > 20_000
    with pytest.raises(ToolError) as refused:
        within_budget(answer, 1000)
    text = str(refused.value)
    assert "1,000" in text and "narrow" in text


# ---- _paged ---------------------------------------------------------------------------


def test_paged_everything_fits() -> None:
    tables = [{"name": f"t{i}"} for i in range(5)]
    page = {"org": "o", "super": "s", "total": 5, "tables": tables}
    out = _paged(page, "tables", 1000, 0)
    assert out["tables"] == tables
    assert out["truncated"] is False
    assert "next_cursor" not in out and "note" not in out
    assert out["org"] == "o" and out["super"] == "s" and out["total"] == 5


def test_paged_empty_list() -> None:
    out = _paged({"pattern": "x", "total": 0, "matches": []}, "matches", 1000, 0)
    assert out["matches"] == [] and out["truncated"] is False
    assert "next_cursor" not in out


@pytest.mark.parametrize("offset", [0, 17])
def test_paged_cut(offset: int) -> None:
    rng = random.Random(3)
    tables = random_items(rng, 60)
    budget = 1000
    out = _paged({"org": "o", "total": 60 + offset, "tables": tables}, "tables", budget, offset)
    keep = len(out["tables"])
    assert 0 < keep < 60
    assert out["tables"] == tables[:keep]
    assert out["truncated"] is True
    assert f"{keep} of 60 tables" in out["note"]
    assert str(budget) in out["note"]
    decoded = decode_cursor(out["next_cursor"], PAGE_CURSOR_FIELDS)
    assert decoded["offset"] == offset + keep
    assert decoded["scope"] == []
    assert estimate_tokens(out) <= budget
    assert out["total"] == 60 + offset  # the caller's keys are kept


@pytest.mark.parametrize("seed", range(8))
def test_paged_following_cursors_rebuilds_the_list(seed: int) -> None:
    """As list_tables does: each call lists everything, then pages from the cursor's
    offset. The pages, in order, are the list exactly, each within the budget."""
    rng = random.Random(100 + seed)
    full = random_items(rng, rng.randint(30, 200))
    whole = estimate_tokens({"org": "o", "super": "s", "total": len(full), "tables": full})
    budget = max(400, min(rng.choice([1000, 1500, 2500, 4000]), whole // 2))
    got: list[dict[str, Any]] = []
    offset, pages = 0, 0
    while True:
        pages += 1
        assert pages <= len(full) + 1, "the cursors do not progress"
        page = {"org": "o", "super": "s", "total": len(full), "tables": full[offset:]}
        out = _paged(page, "tables", budget, offset, ["o", "s"])
        assert estimate_tokens(out) <= budget
        got += out["tables"]
        if not out["truncated"]:
            assert "next_cursor" not in out
            break
        assert out["tables"], "a truncated page with no items"
        offset = _page_offset(out["next_cursor"], ["o", "s"])
        assert offset == len(got)
    assert got == full
    assert pages > 1  # the sizes above do need several pages


def test_paged_shows_an_item_larger_than_the_budget_and_moves_on() -> None:
    """Nothing smaller can be shown: the one item, and a cursor past it (a cursor at the
    same offset would return the same page forever)."""
    items = [{"name": "x" * 6000}, {"name": "small"}, {"name": "also small"}]
    out = _paged({"org": "o", "total": 8, "tables": items}, "tables", 1000, 5)
    assert out["tables"] == items[:1]
    assert out["truncated"] is True
    assert decode_cursor(out["next_cursor"], PAGE_CURSOR_FIELDS)["offset"] == 6
    rest = _paged({"org": "o", "total": 8, "tables": items[1:]}, "tables", 1000, 6)
    assert rest["tables"] == items[1:] and rest["truncated"] is False


def test_paged_cursors_end_when_every_item_is_too_large() -> None:
    full = [{"name": f"{i}" + "x" * 5000} for i in range(4)]
    offset, got = 0, []
    for _ in range(len(full) + 1):
        out = _paged({"total": len(full), "tables": full[offset:]}, "tables", 1000, offset)
        got += out["tables"]
        if not out["truncated"]:
            break
        offset = _page_offset(out["next_cursor"], [])
    assert got == full
    assert not out["truncated"]


def test_page_offset_of_a_cursor_of_the_same_call() -> None:
    scope = ["pat*", "acme", None, "int"]  # search_columns: pattern, org, super, type
    items = random_items(random.Random(12), 80)
    out = _paged({"pattern": "pat*", "matches": items}, "matches", 1000, 0, scope)
    assert out["truncated"] is True
    assert _page_offset(out["next_cursor"], list(scope)) == len(out["matches"])
    assert _page_offset(None, scope) == 0 and _page_offset("", scope) == 0
    for other in (["pat*", "acme", None, None], ["pat", "acme", None, "int"], []):
        with pytest.raises(ToolError, match="other arguments"):
            _page_offset(out["next_cursor"], other)


def test_page_offset_refuses_other_cursors() -> None:
    for cursor in (
        encode_cursor({"offset": 3}),  # no scope
        encode_cursor(cursor_state(offset=3)),  # query_sql's
        encode_cursor({"offset": "3", "scope": []}),
        "garbage",
    ):
        with pytest.raises(ToolError, match="cursor"):
            _page_offset(cursor, [])


# ---- _rows_page -----------------------------------------------------------------------


def test_rows_page_fits_and_not_truncated() -> None:
    rows = [[i, f"s{i}", i / 2] for i in range(20)]
    result = query_result(rows)
    out = _rows_page(result, 1000, cursor_state())
    assert out["rows"] == rows
    assert out["row_count"] == 20
    assert out["columns"] == result["columns"]
    assert out["truncated"] is False
    assert out["elapsed_ms"] == 12.5
    assert "note" not in out and "next_cursor" not in out


def test_rows_page_no_rows() -> None:
    out = _rows_page(query_result([]), 1000, cursor_state())
    assert out["rows"] == [] and out["row_count"] == 0 and out["truncated"] is False
    assert "next_cursor" not in out


@pytest.mark.parametrize("api_truncated", [False, True])
def test_rows_page_cut_by_budget(api_truncated: bool) -> None:
    rows = random_rows(random.Random(1), 200)
    budget = 2000
    state = cursor_state(offset=40)
    out = _rows_page(query_result(rows, truncated=api_truncated), budget, state)
    keep = out["row_count"]
    assert 0 < keep < 200
    assert out["rows"] == rows[:keep]
    assert out["truncated"] is True
    assert "response budget" in out["note"]
    assert f"{keep} of 200 rows" in out["note"] and str(budget) in out["note"]
    assert "next_cursor" in out["note"]
    assert estimate_tokens(out) <= budget
    # Not wasteful: one more row (plus the note and cursor it reserves) would not fit.
    next_row = estimate_tokens(rows[keep]) + 1
    assert estimate_tokens(out) + next_row + 200 > budget
    decoded = decode_cursor(out["next_cursor"], QUERY_CURSOR_FIELDS)
    assert decoded["offset"] == 40 + keep
    assert decoded["org"] == "acme" and decoded["super"] == "sales"
    assert decoded["sql"] == "SELECT * FROM t"
    assert decoded == {**state, "offset": 40 + keep}  # nothing else changed
    assert state["offset"] == 40  # the caller's state is not changed


def test_rows_page_limit_reached_but_fits() -> None:
    rows = [[i, "a", 0.5] for i in range(10)]
    state = cursor_state(offset=30, limit=10)
    out = _rows_page(query_result(rows, truncated=True), 25_000, state)
    assert out["rows"] == rows and out["row_count"] == 10
    assert out["truncated"] is True
    assert re.search(r"\bmore\b.*\b10\b", out["note"]) and "limit" in out["note"]
    assert "response budget" not in out["note"]
    decoded = decode_cursor(out["next_cursor"])
    assert decoded["offset"] == 40
    assert decoded["sql"] == state["sql"] and decoded["org"] == "acme"
    assert decoded["limit"] == 10  # the next page is of the same size


def test_rows_page_without_cursor_state_has_no_cursor() -> None:
    """sample_rows: a cut is reported, but there is nothing to continue."""
    rows = random_rows(random.Random(2), 100)
    out = _rows_page(query_result(rows), 1000, None)
    assert out["truncated"] is True and 0 < out["row_count"] < 100
    assert "next_cursor" not in out
    assert "next_cursor" not in out["note"]
    assert "response budget" in out["note"]
    limited = _rows_page(query_result(rows[:3], truncated=True), 25_000, None)
    assert limited["truncated"] is True and limited["rows"] == rows[:3]
    assert "next_cursor" not in limited


def test_rows_page_single_row_larger_than_budget() -> None:
    rows = [[1, "x" * 10_000, 0.1], [2, "y", 0.2]]
    out = _rows_page(query_result(rows), 1000, cursor_state())
    assert out["rows"] == [] and out["row_count"] == 0
    assert out["truncated"] is True
    assert "single row is larger" in out["note"]
    assert "next_cursor" not in out  # a cursor at the same offset would loop
    assert estimate_tokens(out) <= 1000


def test_rows_page_cursor_keeps_the_page_size() -> None:
    rows = random_rows(random.Random(4), 50)
    state = cursor_state(offset=100, limit=50, v=7)
    out = _rows_page(query_result(rows, truncated=True), 1500, state)
    keep = out["row_count"]
    assert 0 < keep < 50
    decoded = decode_cursor(out["next_cursor"], QUERY_CURSOR_FIELDS)
    assert decoded == {**state, "offset": 100 + keep}  # limit, version, sql: all kept


class FakeQueryApi:
    """The query endpoint's paging (projections/query/engine.py): rows[offset:offset+limit],
    truncated when rows exist past them; the server default limit when none is given."""

    def __init__(self, rows: list[list[Any]], default_limit: int = 1000) -> None:
        self.rows, self.default_limit = rows, default_limit
        self.calls: list[tuple[int, int]] = []

    def query(self, offset: int, limit: int | None) -> dict[str, Any]:
        limit = self.default_limit if limit is None else limit
        self.calls.append((offset, limit))
        return query_result(
            self.rows[offset : offset + limit], truncated=len(self.rows) > offset + limit
        )


def follow(
    api: FakeQueryApi, budget: int, limit: int | None, sql: str = "SELECT * FROM t"
) -> list[dict[str, Any]]:
    """query_sql's cursor handling: the first call with ``sql`` and ``limit``, then each
    next_cursor as the cursor alone (its query, offset and page size), until a page has
    none. Returns the pages."""
    pages: list[dict[str, Any]] = []
    state = cursor_state(sql=sql, offset=0, limit=limit)
    while True:
        assert len(pages) <= len(api.rows) + 2, "the cursors do not progress"
        page = _rows_page(api.query(state["offset"], state["limit"]), budget, state)
        pages.append(page)
        if "next_cursor" not in page:
            return pages
        decoded = decode_cursor(page["next_cursor"], QUERY_CURSOR_FIELDS)
        assert (decoded["org"], decoded["super"], decoded["sql"]) == ("acme", "sales", sql)
        state = cursor_state(sql=decoded["sql"], offset=decoded["offset"], limit=decoded["limit"])


@pytest.mark.parametrize("limit", [7, 25, None])
def test_rows_page_following_cursors_reads_every_row(limit: int | None) -> None:
    """Pages cut by the budget and by the page size alike: in order, the rows exactly,
    each page within the budget and the page size, the last one not truncated."""
    rows = random_rows(random.Random(6), 90)
    api = FakeQueryApi(rows, default_limit=40)
    pages = follow(api, 1000, limit)
    assert [r for p in pages for r in p["rows"]] == rows
    assert all(estimate_tokens(p) <= 1000 for p in pages)
    assert all(p["row_count"] == len(p["rows"]) <= (limit or 40) for p in pages)
    assert all(p["truncated"] for p in pages[:-1])
    assert pages[-1]["truncated"] is False and "note" not in pages[-1]
    # The page size given first is the one every later call asks for.
    assert {size for _, size in api.calls} == {limit or 40}
    by_budget = ["response budget" in p["note"] for p in pages[:-1]]
    if limit == 7:  # 7 rows always fit: every cut is the page size's
        assert not any(by_budget) and all("its limit" in p["note"] for p in pages[:-1])
    else:
        assert any(by_budget)


def test_rows_page_following_cursors_with_a_long_query() -> None:
    columns = ", ".join(f"o.customer_attribute_{i} AS attr_{i}" for i in range(25))
    sql = f"SELECT {columns} FROM orders o JOIN customers c USING (customer_id)"
    assert 900 < len(sql) < 1100
    rows = random_rows(random.Random(11), 60)
    pages = follow(FakeQueryApi(rows), 1000, None, sql=sql)
    assert len(pages) > 3
    assert [r for p in pages for r in p["rows"]] == rows
    assert all(estimate_tokens(p) <= 1000 for p in pages)


@pytest.mark.parametrize("budget", [1000, 25_000])
def test_rows_page_within_budget_with_a_long_query(budget: int) -> None:
    # The cursor carries the whole SQL (in base64, 4/3 of its JSON): the page must
    # leave room for it, not a fixed guess (it once reserved 400 characters).
    columns = ", ".join(f"o.customer_attribute_{i} AS attr_{i}" for i in range(40))
    sql = f"SELECT {columns} FROM orders o JOIN customers c USING (customer_id) WHERE o.x > 0"
    assert 1000 < len(sql) < 2000
    rows = random_rows(random.Random(10), 20 * budget // 100)
    out = _rows_page(query_result(rows), budget, cursor_state(sql=sql))
    assert out["truncated"] is True and out["row_count"] > 0
    assert decode_cursor(out["next_cursor"])["sql"] == sql
    assert estimate_tokens(out) <= budget, (
        f"page of {estimate_tokens(out)} tokens for a budget of {budget} "
        f"(cursor of {len(out['next_cursor'])} characters)"
    )


@pytest.mark.parametrize(("budget", "ids"), [(1000, 700), (25_000, 13_000)])
def test_rows_page_small_result_of_a_long_query_is_not_cut(budget: int, ids: int) -> None:
    # Regression (was a bug): _rows_page always reserved room for a next_cursor (which
    # carries the SQL), even when every row fits and the API did not truncate. A
    # long query - e.g. a count over a big IN list: 3,400 characters at the minimum
    # budget of 1000 tokens, 80,000 at the default 25,000 (the API allows 100,000) -
    # then got a one-row answer cut to 0 rows, no cursor, and a note blaming "a single
    # row larger than the budget". The reserve now applies only when rows must be cut.
    sql = "SELECT count(*) FROM t WHERE id IN (" + ", ".join(map(str, range(ids))) + ")"
    result = {"columns": [{"name": "count_star()", "type": "int64"}], "rows": [[42]],
              "truncated": False, "elapsed_ms": 3.0}  # fmt: skip
    assert estimate_tokens(result) < 50  # the answer itself is tiny
    assert len(sql) <= 100_000  # within the API's query_max_sql_chars
    out = _rows_page(result, budget, cursor_state(sql=sql))
    assert out["rows"] == [[42]], out.get("note")
    assert out["truncated"] is False


# ---- cursors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        {"offset": 0},
        {"offset": 123456789},
        cursor_state(sql="SELECT \"ünïcødé\", '日本' FROM t WHERE a <> 'x/y+z'", limit=3),
        {"nested": {"a": [1, 2.5, None, True]}, "empty": ""},
        {},
    ],
)
def test_cursor_round_trip(state: dict[str, Any]) -> None:
    cursor = encode_cursor(state)
    assert re.fullmatch(r"[A-Za-z0-9_\-]*=*", cursor), "not URL-safe"
    assert decode_cursor(cursor) == state


def test_cursors_differ_by_state() -> None:
    assert encode_cursor({"offset": 1}) != encode_cursor({"offset": 2})


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "garbage!!",
        "abc",  # bad padding
        "%%%%",
        "élan",
        b64(b"\xff\xfe\xfd"),  # not UTF-8
        b64(b"not json"),
        b64(b'{"offset": 1'),  # cut off
        b64(b"[1, 2]"),
        b64(b"42"),
        b64(b"null"),
        b64(b'"offset"'),
        b64(b"true"),
    ],
)
def test_decode_cursor_refuses_anything_else(cursor: str) -> None:
    with pytest.raises(ToolError, match="cursor"):
        decode_cursor(cursor)


def test_decode_cursor_refuses_deeply_nested_json() -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting.
    with pytest.raises(ToolError, match="cursor"):
        decode_cursor(b64(b"[" * 100_000))


def test_decode_cursor_refuses_a_huge_cursor() -> None:
    state = {"offset": 1, "pad": "x" * 300_000}  # a valid cursor, just far too long
    with pytest.raises(ToolError, match="cursor"):
        decode_cursor(encode_cursor(state))
    # A long query's cursor is still fine.
    long_sql = {"offset": 3, "sql": "SELECT " + "a, " * 10_000 + "b FROM t"}
    assert decode_cursor(encode_cursor(long_sql)) == long_sql


def test_decode_cursor_checks_the_fields_a_tool_needs() -> None:
    good = cursor_state(offset=40, limit=10)
    assert decode_cursor(encode_cursor(good), QUERY_CURSOR_FIELDS) == good
    assert decode_cursor(encode_cursor({"offset": 0}), {"offset": int}) == {"offset": 0}
    refused = [
        {"offset": 3},  # list_tables' cursor given to query_sql
        {**good, "offset": "40"},  # a number as text
        {**good, "offset": 4.0},
        {**good, "offset": True},  # a bool is an int to isinstance
        {**good, "offset": None},
        {**good, "sql": ""},
        {**good, "sql": ["SELECT 1"]},
        {k: v for k, v in good.items() if k != "org"},
    ]
    for state in refused:
        with pytest.raises(ToolError, match="cursor"):
            decode_cursor(encode_cursor(state), QUERY_CURSOR_FIELDS)
    # query_sql's cursor given to list_tables: it has an offset, which is all it needs.
    assert decode_cursor(encode_cursor(good), {"offset": int})["offset"] == 40
    with pytest.raises(ToolError, match="cursor"):
        decode_cursor(encode_cursor({"after": 3}), {"offset": int})


# ---- CallLimiter ----------------------------------------------------------------------


async def hold(
    limiter: CallLimiter,
    principal: str,
    release: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Take a slot, report it taken, and keep it until ``release`` is set."""
    async with limiter.slot(principal):
        task_status.started()
        await release.wait()


@pytest.mark.anyio
async def test_limiter_per_principal() -> None:
    limiter = CallLimiter(total=10, per_principal=3)
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            await tg.start(hold, limiter, "alice", release)
        assert limiter.running == 3 and limiter.by_principal["alice"] == 3
        with pytest.raises(ToolError) as refused:
            async with limiter.slot("alice"):
                pytest.fail("a fourth slot of the same principal")
        assert "3" in str(refused.value) and "principal" in str(refused.value)
        assert "10" not in str(refused.value)  # the per-principal limit, not the overall
        assert limiter.running == 3 and limiter.by_principal["alice"] == 3  # nothing leaked
        # Another principal still gets slots, while alice's are held.
        await tg.start(hold, limiter, "bob", release)
        async with limiter.slot("bob"):
            assert limiter.by_principal == {"alice": 3, "bob": 2}
            assert limiter.running == 5
        release.set()
    assert limiter.running == 0
    assert dict(limiter.by_principal) == {}
    async with limiter.slot("alice"):  # free again
        assert limiter.running == 1


@pytest.mark.anyio
async def test_limiter_overall() -> None:
    limiter = CallLimiter(total=3, per_principal=2)
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(hold, limiter, "alice", release)
        await tg.start(hold, limiter, "bob", release)
        await tg.start(hold, limiter, "carol", release)
        for who in ("dave", "alice"):  # a newcomer, and one under its own limit
            with pytest.raises(ToolError) as refused:
                async with limiter.slot(who):
                    pytest.fail("a slot past the overall limit")
            assert "limit of 3" in str(refused.value)
        assert limiter.running == 3 and "dave" not in limiter.by_principal
        release.set()
    assert limiter.running == 0 and dict(limiter.by_principal) == {}
    release2 = anyio.Event()
    async with anyio.create_task_group() as tg:  # the three slots can be taken again
        for who in ("dave", "dave", "erin"):
            await tg.start(hold, limiter, who, release2)
        assert limiter.running == 3
        release2.set()
    assert limiter.running == 0


@pytest.mark.anyio
async def test_limiter_releases_on_exception() -> None:
    limiter = CallLimiter(total=2, per_principal=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with limiter.slot("alice"):
            assert limiter.running == 1
            raise RuntimeError("boom")
    assert limiter.running == 0 and dict(limiter.by_principal) == {}
    with pytest.raises(ToolError, match="try again"):
        async with limiter.slot("alice"):
            raise ToolError("try again")  # a tool error inside the call, too
    assert limiter.running == 0
    async with limiter.slot("alice"):  # the one slot per principal is free again
        assert limiter.by_principal["alice"] == 1


@pytest.mark.anyio
async def test_limiter_releases_on_cancellation() -> None:
    limiter = CallLimiter(total=4, per_principal=4)
    never = anyio.Event()
    async with anyio.create_task_group() as tg:
        for who in ("a", "a", "b"):
            await tg.start(hold, limiter, who, never)
        assert limiter.running == 3
        tg.cancel_scope.cancel()  # e.g. the call's timeout
    assert limiter.running == 0 and dict(limiter.by_principal) == {}


# ---- describe_error -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "keyword"),
    [
        (401, "credential"),
        (403, "not allowed"),
        (404, "does not exist"),
        (408, "timeout"),
        (429, "too many requests"),
    ],
)
def test_describe_error_has_code_message_and_hint(status: int, keyword: str) -> None:
    text = describe_error(ApiError(status, "some_code", "what the API said"))
    assert text.startswith("some_code: what the API said")
    assert keyword in text
    assert text.count(keyword) == 1
    # The same hint is not added twice when the API's message already has it.
    hint = text[len("some_code: what the API said (") : -1]
    assert keyword in hint
    again = describe_error(ApiError(status, "some_code", f"refused ({hint})"))
    assert again.count(hint) == 1
    assert again == f"some_code: refused ({hint})"


@pytest.mark.parametrize("status", [400, 409, 500, 503])
def test_describe_error_without_hint(status: int) -> None:
    assert describe_error(ApiError(status, "sql_error", "SQL error: x")) == (
        "sql_error: SQL error: x"
    )


def test_describe_error_hints_differ() -> None:
    texts = {describe_error(ApiError(s, "c", "m")) for s in (401, 403, 404, 408, 429)}
    assert len(texts) == 5


# ---- quote ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["plain", "with space", 'a"b', '"', '""', 'x"; DROP TABLE t; --', "Ümlaut", "select"],
)
def test_quote_round_trips_through_duckdb(name: str) -> None:
    quoted = quote(name)
    assert quoted.startswith('"') and quoted.endswith('"')
    # Every embedded quote is doubled: no unpaired quote inside.
    assert '"' not in quoted[1:-1].replace('""', "")
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE {quote('t' + name)} ({quoted} INTEGER)")
        con.execute(f"INSERT INTO {quote('t' + name)} VALUES (7)")
        relation = con.sql(f"SELECT {quoted} FROM {quote('t' + name)}")
        assert relation.columns == [name]
        assert relation.fetchall() == [(7,)]


# ---- choose_columns --------------------------------------------------------------------------

COLUMNS = [
    {"name": "id", "type": "int64"},
    {"name": "email", "type": "string"},
    {"name": "amount", "type": "double"},
]


def test_choose_all_when_none_asked() -> None:
    assert choose_columns(COLUMNS, None) == COLUMNS
    assert choose_columns(COLUMNS, []) == COLUMNS


def test_choose_follows_the_request_order() -> None:
    assert choose_columns(COLUMNS, ["amount", "id"]) == [COLUMNS[2], COLUMNS[0]]
    assert choose_columns(COLUMNS, ["email"]) == [COLUMNS[1]]


def test_choose_unknown_column_lists_the_available_ones() -> None:
    with pytest.raises(ToolError) as refused:
        choose_columns(COLUMNS, ["id", "nope", "also_not"])
    text = str(refused.value)
    assert "'nope'" in text and "'also_not'" in text
    assert "'id'" not in text  # only the missing ones are named as missing
    listed = text[text.index("columns:") :]
    for c in COLUMNS:
        assert c["name"] in listed


def test_choose_from_no_columns() -> None:
    with pytest.raises(ToolError, match="none"):
        choose_columns([], ["x"])


# ---- base_url and the RFC 9728 metadata -----------------------------------------------


def scope(headers: dict[str, str], scheme: str = "http") -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": scheme,
        "path": "/mcp",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }


def test_base_url_setting_wins() -> None:
    s = scope({"host": "internal:8000", "x-forwarded-host": "proxy.example"})
    assert base_url(s, "https://lake.example.com/") == "https://lake.example.com"
    assert base_url(s, "https://lake.example.com/base") == "https://lake.example.com/base"


@pytest.mark.parametrize(
    ("headers", "scheme", "expected"),
    [
        ({"host": "lake.local:8000"}, "http", "http://lake.local:8000"),
        ({"host": "lake.local"}, "https", "https://lake.local"),
        ({"host": "127.0.0.1:65535"}, "http", "http://127.0.0.1:65535"),
        ({"host": "[::1]:8000"}, "http", "http://[::1]:8000"),
        ({}, "http", "http://localhost"),
        ({}, "https", "https://localhost"),
    ],
)
def test_base_url_from_the_request(headers: dict[str, str], scheme: str, expected: str) -> None:
    assert base_url(scope(headers, scheme), None) == expected
    assert base_url(scope(headers, scheme), "") == expected


def test_base_url_does_not_trust_forwarded_headers() -> None:
    """Anyone can send X-Forwarded-*: behind a proxy, the setting gives the URL."""
    s = scope(
        {
            "host": "lake.local:8000",
            "x-forwarded-host": "evil.example",
            "x-forwarded-proto": "https",
        }
    )
    assert base_url(s, None) == "http://lake.local:8000"


@pytest.mark.parametrize(
    "host",
    ['evil.example/"', "a b", "lake.local:8000/path", "user@lake.local", 'x", error="y', ""],
)
def test_base_url_refuses_a_host_that_is_not_a_host_name(host: str) -> None:
    """The URL goes into a WWW-Authenticate header: no quotes, paths or spaces."""
    assert base_url(scope({"host": host}), None) == "http://localhost"


def test_base_url_without_headers_or_scheme() -> None:
    assert base_url({"type": "http"}, None) == "http://localhost"


def test_metadata_with_authorization_servers_and_scopes() -> None:
    settings = Settings(
        public_url="https://lake.example.com/",
        mcp_authorization_servers=" https://auth.example.com , ,https://other.example.org/x ",
        jwt_issuer="https://issuer.example.net",
        jwt_required_scopes="  mcp:read   lake.query ",
    )
    base = base_url(scope({"host": "internal"}), settings.public_url)
    doc = protected_resource_metadata(base, settings)
    assert doc["resource"] == "https://lake.example.com/mcp"
    assert doc["authorization_servers"] == [
        "https://auth.example.com",
        "https://other.example.org/x",
    ]  # the configured ones, trimmed, before the JWT issuer
    assert doc["scopes_supported"] == ["mcp:read", "lake.query"]
    assert doc["bearer_methods_supported"] == ["header"]
    json.dumps(doc)  # served as JSON


def test_metadata_falls_back_to_the_jwt_issuer() -> None:
    settings = Settings(mcp_authorization_servers=" , ", jwt_issuer="https://issuer.example.net")
    doc = protected_resource_metadata("http://h:1", settings)
    assert doc["resource"] == "http://h:1/mcp"
    assert doc["authorization_servers"] == ["https://issuer.example.net"]
    assert "scopes_supported" not in doc


def test_metadata_with_api_tokens_only() -> None:
    settings = Settings(jwt_required_scopes="   ")
    base = base_url(scope({"host": "lake.example.com"}, "https"), settings.public_url)
    doc = protected_resource_metadata(base, settings)
    assert doc["resource"] == "https://lake.example.com/mcp"
    assert "authorization_servers" not in doc
    assert "scopes_supported" not in doc
