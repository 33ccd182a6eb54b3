"""The MCP tools under row policies (issue 18): for a reader whose role has a row
filter, a hidden column and a masked column, no tool shows the hidden column's name,
the unfiltered row count or the masked column's statistics; the admin's tools show all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import ClientSession

from app.api.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.mcp.test_mcp import World, call, fails, make_settings, ok, principal, session
from tests.support.threaded_server import ThreadedServer

pytestmark = pytest.mark.anyio

HIDDEN = "ssn_number"
ROWS = [
    {"id": i, "region": ("eu", "us", "eu", "apac", "eu")[i % 5], "email": f"u{i}@x",
     HIDDEN: f"{i:03d}-00", "amount": i * 10}
    for i in range(5)
]  # fmt: skip
EU = [r for r in ROWS if r["region"] == "eu"]
POLICY = {
    "role": "reader",
    "row_filter": "region = :principal.region",
    "hidden": [HIDDEN],
    "masks": {"email": "hash"},
}
TABLE = {"org": "acme", "super": "sales", "table": "people"}


@pytest.fixture(scope="module")
def world(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = make_settings(redis_url, tmp_path_factory.mktemp("mcp-meta") / "data")
    server = ThreadedServer(create_app(settings, redis_url), ADMIN_TOKEN)
    server.start()
    try:
        admin = server.http
        url = "/v1/acme/sales/tables/people"
        ok(admin.post(f"{url}/rows", json=ROWS[:3]))
        ok(admin.post(f"{url}/rows", json=ROWS[3:]))
        ok(admin.post(f"{url}/delete", json={"where": f"{HIDDEN} = '999-00'"}))
        ok(admin.put(f"{url}/policies", json={"policies": [POLICY]}))
        tokens = {
            "admin": ADMIN_TOKEN,
            "eu": principal(admin, "eu-reader", "acme", {"role": "reader"}, region="eu"),
        }
        yield World(settings, server, tokens)
    finally:
        server.stop()


def dumped(value: Any) -> str:
    return json.dumps(value, default=str)


async def test_the_world_is_what_the_tests_assume(world: World) -> None:
    count = {"sql": "select count(*) from people"}
    assert ok(world.api().post("/v1/acme/sales/query", json=count))["rows"] == [[len(ROWS)]]
    assert ok(world.api("eu").post("/v1/acme/sales/query", json=count))["rows"] == [[len(EU)]]
    assert len(EU) != len(ROWS)


async def test_describe_table_counts_what_the_reader_may_see(world: World) -> None:
    async with session(world.url, world.tokens["eu"]) as s:
        detail = await call(s, "describe_table", **TABLE)
    assert HIDDEN not in dumped(detail)
    assert detail["row_count"] == len(EU) and "row_count" not in detail["withheld"]
    assert {"file_count", "size_bytes", "stats"} <= set(detail["withheld"])
    assert detail["file_count"] is None and detail["stats"] == {}
    assert detail["withheld_reason"] and detail["row_count_note"]
    email = next(c for c in detail["columns"] if c["name"] == "email")
    assert email["masked"] is True and email["mask"] == "hash"
    async with session(world.url, ADMIN_TOKEN) as s:
        full = await call(s, "describe_table", **TABLE)
    assert full["row_count"] == len(ROWS) and "withheld" not in full
    assert set(full["stats"]) == set(ROWS[0]) and "row_count_note" not in full


async def test_stats_and_profile_withhold_the_masked_column(world: World) -> None:
    async with session(world.url, world.tokens["eu"]) as s:
        stats = await call(s, "get_table_stats", **TABLE)
        profile = await call(s, "profile_column", **TABLE, column="email")
        amount = await call(s, "profile_column", **TABLE, column="amount")
        refused = await fails(s, "profile_column", **TABLE, column=HIDDEN)
        chosen = await call(s, "get_table_stats", **TABLE, columns=["email", "id"])
    assert HIDDEN not in dumped(stats) and HIDDEN not in dumped(profile)
    assert stats["row_count"] == len(EU)
    assert list(stats["columns"]) == ["id", "region", "email", "amount"]
    email = stats["columns"]["email"]
    assert email["masked"] is True and email["withheld"]
    assert not {"min", "max", "null_count", "distinct_estimate"} & set(email)
    assert stats["columns"]["amount"]["max"] == max(r["amount"] for r in EU)
    assert list(chosen["columns"]) == ["email", "id"] and chosen["columns"]["email"]["masked"]
    assert profile["masked"] is True and profile["row_count"] == len(EU)
    assert not {"top_values", "histogram", "min", "max", "null_count"} & set(profile)
    assert amount["row_count"] == len(EU) and amount["top_values"]
    assert "no column" in refused and "amount" in refused  # the columns it lists
    async with session(world.url, ADMIN_TOKEN) as s:
        full = await call(s, "get_table_stats", **TABLE)
        top = await call(s, "profile_column", **TABLE, column="email")
    assert full["row_count"] == len(ROWS) and HIDDEN in full["columns"]
    assert full["columns"]["email"]["distinct_estimate"] >= 1 and "masked" not in top
    assert len(top["top_values"]) == len(ROWS)


async def test_sample_and_search_flag_the_masked_column_and_omit_the_hidden(
    world: World,
) -> None:
    async with session(world.url, world.tokens["eu"]) as s:
        sample = await call(s, "sample_rows", **TABLE, n=10)
        everything = await call(s, "search_columns", pattern="*", org="acme")
        hidden = await call(s, "search_columns", pattern="ssn")
    assert HIDDEN not in dumped(sample) and HIDDEN not in dumped(everything)
    assert sample["masked_columns"] == {"email": "hash"} and len(sample["rows"]) == len(EU)
    emails = [r[2] for r in sample["rows"]]
    assert all(len(e) == 64 for e in emails)  # hashes, not the addresses
    found = {m["column"]: m for m in everything["matches"]}
    assert found["email"]["masked"] is True and "masked" not in found["id"]
    assert hidden["matches"] == [] and hidden["total"] == 0
    async with session(world.url, ADMIN_TOKEN) as s:
        assert (await call(s, "search_columns", pattern="ssn"))["total"] == 1
        assert "masked_columns" not in await call(s, "sample_rows", **TABLE)


async def test_lists_meta_history_events_and_the_schema_resource(world: World) -> None:
    async with session(world.url, world.tokens["eu"]) as s:
        answers = {
            "list_tables": await call(s, "list_tables", org="acme", super="sales"),
            "get_super_meta": await call(s, "get_super_meta", org="acme", super="sales"),
            "table_history": await call(s, "table_history", **TABLE),
            "list_events": await call(s, "list_events", org="acme", super="sales"),
            "resource": json.loads(await resource(s, "schema://acme/sales/people")),
        }
    for name, answer in answers.items():
        assert HIDDEN not in dumped(answer), name
    for name in ("list_tables", "get_super_meta"):
        (people,) = answers[name]["tables"]
        assert people["row_count"] is None and "row_count" in people["withheld"], name
    assert answers["get_super_meta"]["row_count"] is None
    entries = answers["table_history"]["entries"]
    assert entries and all(e["rows_added"] is None for e in entries)
    events = answers["list_events"]["events"]
    assert all("files" not in e and "rows" not in e and "where" not in e for e in events)
    assert answers["resource"]["row_count"] is None
    async with session(world.url, ADMIN_TOKEN) as s:
        meta = await call(s, "get_super_meta", org="acme", super="sales")
        history = await call(s, "table_history", **TABLE)
        admin_events = await call(s, "list_events", org="acme", super="sales")
    assert meta["row_count"] == len(ROWS) and "withheld" not in dumped(meta)
    assert sum(e["rows_added"] for e in history["entries"]) == len(ROWS)
    assert HIDDEN in dumped(admin_events) and any("files" in e for e in admin_events["events"])


async def test_bad_inputs_fail_without_a_leak(world: World) -> None:
    async with session(world.url, world.tokens["eu"]) as s:
        for tool, args in (
            ("describe_table", {**TABLE, "table": "nope"}),
            ("get_table_stats", {**TABLE, "as_of_version": 999}),
            ("get_table_stats", {**TABLE, "columns": [HIDDEN]}),
            ("sample_rows", {**TABLE, "columns": [HIDDEN]}),
            ("table_history", {**TABLE, "after": "yesterday"}),
        ):
            text = await fails(s, tool, **args)
            assert str(len(ROWS)) + " rows" not in text, tool
            if HIDDEN not in json.dumps(args):
                assert HIDDEN not in text, (tool, text)


async def resource(s: ClientSession, uri: str) -> str:
    result = await s.read_resource(uri)
    text: str = result.contents[0].text  # type: ignore[union-attr]
    return text
