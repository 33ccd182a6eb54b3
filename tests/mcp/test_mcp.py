"""The MCP server, driven by the official MCP client over streamable HTTP (mounted at
/mcp in a real uvicorn server), over stdio (``ledgerlake mcp`` as a subprocess) and as
the standalone HTTP server: every tool, resources and prompts, auth failures, tenancy
and row-level security, the response budget, concurrency limits and timeouts."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import httpx2
import msgspec
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver.exceptions import ToolError

from app.api.app import create_app
from app.mcp.backend import Backend, McpConfig
from app.mcp.budget import encode_cursor, estimate_tokens
from app.mcp.gate import PRM_PATH
from app.mcp.server import standalone_app
from app.settings import Settings, package_version
from tests.conftest import ADMIN_TOKEN
from tests.support.threaded_server import ThreadedServer

pytestmark = pytest.mark.anyio

TOOLS = {
    "health", "info", "whoami", "list_orgs", "list_supers", "list_tables",
    "describe_table", "get_table_stats", "get_super_meta", "table_history",
    "sample_rows", "profile_column", "search_columns", "validate_sql", "query_sql",
    "list_events",
}  # fmt: skip
REGIONS = ["eu", "us", "apac"]
ORDERS = [
    {
        "id": i,
        "region": REGIONS[i % 3] if i % 7 else None,
        "amount": round(i * 1.25, 2) if i % 11 else None,
        "email": f"user{i}@example.com",
        "note": "x" * (i % 5) * 20,
    }
    for i in range(1, 121)
]
CUSTOMERS = [{"customer_id": i, "name": f"c{i}", "region": REGIONS[i % 3]} for i in range(30)]
POLICY = {"role": "reader", "row_filter": "region = :principal.region", "hidden": ["email"]}


@dataclass
class World:
    settings: Settings
    server: ThreadedServer
    tokens: dict[str, str]  # who -> API token

    @property
    def url(self) -> str:
        return self.server.base + "/mcp"

    def api(self, who: str = "admin") -> httpx.Client:
        headers = {"authorization": f"Bearer {self.tokens[who]}"}
        return httpx.Client(base_url=self.server.base, headers=headers, timeout=60)

    @property
    def backend(self) -> Backend:
        backend: Backend = self.server.app.state.mcp
        return backend


def make_settings(redis_url: str, data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        redis_url=redis_url,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        inline_max_rows=0,
        mirrors="none",
        api_token=ADMIN_TOKEN,
        **extra,
    )


def ok(response: httpx.Response) -> Any:
    assert response.status_code < 300, response.text
    return response.json()


def principal(admin: httpx.Client, name: str, org: str, grant: dict[str, Any], **attrs: str) -> str:
    """A principal with one grant; its new API token."""
    pid = ok(admin.post("/v1/principals", json={"name": name, "org": org, "attributes": attrs}))
    ok(admin.post("/v1/grants", json={"principal_id": pid["id"], "org": org, **grant}))
    token: str = ok(admin.post(f"/v1/principals/{pid['id']}/tokens", json={}))["token"]
    return token


def seed(server: ThreadedServer) -> dict[str, str]:
    admin = server.http
    ok(admin.post("/v1/acme/sales/tables/orders/rows", json=ORDERS[:60]))
    ok(admin.post("/v1/acme/sales/tables/orders/rows", json=ORDERS[60:]))
    ok(admin.post("/v1/acme/sales/tables/customers/rows", json=CUSTOMERS))
    ok(admin.post("/v1/acme/sales/tables/big/rows", json=[{"x": i} for i in range(3000)]))
    ok(admin.post("/v1/acme/hr/tables/staff/rows", json=[{"staff_id": 1, "salary": 10}]))
    ok(admin.post("/v1/globex/ops/tables/tickets/rows", json=[{"ticket_id": 1, "region": "x"}]))
    ok(admin.put("/v1/acme/sales/tables/orders/policies", json={"policies": [POLICY]}))
    return {
        "admin": ADMIN_TOKEN,
        "eu": principal(admin, "eu-analyst", "acme", {"role": "reader"}, region="eu"),
        "us": principal(admin, "us-analyst", "acme", {"role": "reader"}, region="us"),
        "customers": principal(
            admin,
            "customers-only",
            "acme",
            {"role": "reader", "super": "sales", "table": "customers"},
        ),
        "globex": principal(admin, "globex-admin", "globex", {"role": "org_admin"}),
    }


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[ThreadedServer]:
    assert settings.redis_url
    server = ThreadedServer(create_app(settings, settings.redis_url), ADMIN_TOKEN)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = make_settings(redis_url, tmp_path_factory.mktemp("mcp") / "data")
    server = ThreadedServer(create_app(settings, redis_url), ADMIN_TOKEN)
    server.start()
    try:
        yield World(settings, server, seed(server))
    finally:
        server.stop()


@asynccontextmanager
async def session(url: str, token: str | None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        yield s


def leaves(exc: BaseException) -> str:
    """The messages of the exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return " | ".join(leaves(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def call(s: ClientSession, tool: str, **args: Any) -> Any:
    result = await s.call_tool(tool, args)
    assert not result.is_error, text_of(result)
    # The text the model reads is the same JSON as the structured content, compact.
    assert json.loads(text_of(result)) == result.structured_content
    return result.structured_content


async def fails(s: ClientSession, tool: str, **args: Any) -> str:
    result = await s.call_tool(tool, args)
    assert result.is_error, result.structured_content
    text = text_of(result)
    assert "Traceback" not in text and 'File "' not in text
    return text


def api_rows(c: httpx.Client, sql: str, **extra: Any) -> Any:
    return ok(c.post("/v1/acme/sales/query", json={"sql": sql, **extra}))


# -- the catalog of tools -----------------------------------------------------------------


async def test_every_tool_is_listed_typed_described_and_read_only(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert tool.annotations and tool.annotations.read_only_hint, tool.name
        props = tool.input_schema.get("properties", {})
        assert "ctx" not in props
        for name, prop in props.items():
            assert "type" in prop or "anyOf" in prop, (tool.name, name)
    query = tools["query_sql"].input_schema
    assert set(query["required"]) == {"org", "super"}
    assert query["properties"]["as_of_version"]["anyOf"][0]["type"] == "integer"
    assert "description" in query["properties"]["cursor"]


async def test_catalog_tools_return_what_the_api_returns(world: World) -> None:
    api = world.api()
    async with session(world.url, ADMIN_TOKEN) as s:
        health = await call(s, "health")
        assert health["status"] == ok(api.get("/health"))["status"] == "ok"
        info = await call(s, "info")
        assert info["version"] == package_version()
        assert info["query"]["max_limit"] == world.settings.query_max_limit
        assert info["mcp_server"]["token_budget"] == world.settings.mcp_token_budget
        assert "2025-06-18" in info["mcp_server"]["protocol_revisions"]
        assert await call(s, "whoami") == ok(api.get("/v1/whoami"))
        assert await call(s, "list_orgs") == ok(api.get("/v1/orgs"))
        assert await call(s, "list_supers", org="acme") == ok(api.get("/v1/acme/supers"))
        listed = await call(s, "list_tables", org="acme", super="sales")
        assert listed["tables"] == ok(api.get("/v1/acme/sales/tables"))["tables"]
        assert listed["truncated"] is False and listed["total"] == 3
        detail = await call(s, "describe_table", org="acme", super="sales", table="orders")
        assert detail == ok(api.get("/v1/acme/sales/tables/orders"))
        assert detail["row_count"] == len(ORDERS)
        meta = await call(s, "get_super_meta", org="acme", super="sales")
        assert meta["table_count"] == 3
        assert meta["row_count"] == sum(t["row_count"] for t in listed["tables"])
        assert meta["size_bytes"] == sum(t["size_bytes"] for t in listed["tables"])
        assert meta["created_by"] and meta["tables"] == listed["tables"]
        history = await call(s, "table_history", org="acme", super="sales", table="orders")
        api_history = ok(api.get("/v1/acme/sales/tables/orders/history"))
        assert history["entries"] == api_history["entries"]
        assert [e["version"] for e in history["entries"]] == [0, 1, 2, 3]
        events = await call(s, "list_events", org="acme", super="sales", limit=3)
        api_events = ok(api.get("/v1/events", params={"org": "acme", "super": "sales", "limit": 3}))
        assert events["events"] == api_events["events"]
        assert events["next_after"] == api_events["next_after"]


async def test_query_and_validate_match_the_api(world: World) -> None:
    api = world.api()
    sql = "select region, count(*) n, sum(amount) total from orders group by 1 order by 1"
    async with session(world.url, ADMIN_TOKEN) as s:
        result = await call(s, "query_sql", org="acme", super="sales", sql=sql)
        want = api_rows(api, sql)
        assert result["rows"] == want["rows"] and result["columns"] == want["columns"]
        assert result["truncated"] is False and "next_cursor" not in result
        # as_of_version: the table after its first append only
        old = await call(
            s, "query_sql", org="acme", super="sales", sql="select count(*) from orders",
            as_of_version=1,
        )  # fmt: skip
        assert old["rows"] == [[60]]
        plan = await call(s, "validate_sql", org="acme", super="sales", sql=sql)
        assert plan["valid"] is True
        assert plan["columns"] == want["columns"] and plan["tables"] == ["orders"]
        assert "GROUP_BY" in plan["plan"] or "AGGREGATE" in plan["plan"]
        join = "select c.name, o.amount from orders o join customers c on o.id = c.customer_id"
        assert (await call(s, "validate_sql", org="acme", super="sales", sql=join))["tables"] == [
            "customers",
            "orders",
        ]
        for bad in (
            "select nope from orders",
            "select * from missing_table",
            "delete from orders",
            "select 1; select 2",
        ):
            out = await call(s, "validate_sql", org="acme", super="sales", sql=bad)
            assert out["valid"] is False and out["error"]["message"], bad
            # the same refusal as running it
            api_error = api.post("/v1/acme/sales/query", json={"sql": bad}).json()["error"]
            assert out["error"] == {"code": api_error["code"], "message": api_error["message"]}
    # Nothing ran: the rows of the table are still all there, and no query was audited
    # for the validations (the audit has the queries of this test only).
    audited = ok(api.get("/v1/audit", params={"org": "acme", "kind": "query"}))["entries"]
    assert not any(e["sql"] == join for e in audited)


async def test_stats_sample_and_profile_are_computed_from_the_rows(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        stats = await call(s, "get_table_stats", org="acme", super="sales", table="orders")
        assert stats["row_count"] == len(ORDERS)
        amounts = [r["amount"] for r in ORDERS if r["amount"] is not None]
        a = stats["columns"]["amount"]
        assert (a["min"], a["max"]) == (min(amounts), max(amounts))
        assert a["null_count"] == len(ORDERS) - len(amounts)
        assert abs(a["distinct_estimate"] - len(set(amounts))) <= 0.3 * len(set(amounts))
        r = stats["columns"]["region"]
        assert r["null_count"] == sum(1 for o in ORDERS if o["region"] is None)
        assert r["distinct_estimate"] == 3 and (r["min"], r["max"]) == ("apac", "us")
        only = await call(
            s, "get_table_stats", org="acme", super="sales", table="orders", columns=["id"]
        )
        assert set(only["columns"]) == {"id"} and only["columns"]["id"]["max"] == 120
        assert "nope" in await fails(
            s, "get_table_stats", org="acme", super="sales", table="orders", columns=["nope"]
        )

        sample = await call(s, "sample_rows", org="acme", super="sales", table="orders", n=7)
        names = [c["name"] for c in sample["columns"]]
        assert sample["row_count"] == 7 and names == list(ORDERS[0])
        by_id = {o["id"]: [o[k] for k in names] for o in ORDERS}
        assert all(row == by_id[row[0]] for row in sample["rows"])
        first = await call(
            s, "sample_rows", org="acme", super="sales", table="orders", n=3, random=False,
            columns=["id", "region"],
        )  # fmt: skip
        assert first["rows"] == [[o["id"], o["region"]] for o in ORDERS[:3]]

        profile = await call(
            s, "profile_column", org="acme", super="sales", table="orders", column="amount",
            bins=5,
        )  # fmt: skip
        assert profile["row_count"] == len(ORDERS)
        assert profile["null_count"] == len(ORDERS) - len(amounts)
        assert (profile["min"], profile["max"]) == (min(amounts), max(amounts))
        assert profile["mean"] == pytest.approx(sum(amounts) / len(amounts))
        assert len(profile["histogram"]) == 5
        assert sum(b["count"] for b in profile["histogram"]) == len(amounts)
        low = profile["histogram"][0]
        assert low["count"] == sum(1 for x in amounts if x < low["to"])
        regions = await call(
            s, "profile_column", org="acme", super="sales", table="orders", column="region",
            top=2,
        )  # fmt: skip
        counts = Counter(o["region"] for o in ORDERS)
        counted = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))[:2]
        assert [(t["value"], t["count"]) for t in regions["top_values"]] == counted
        assert "histogram" not in regions and "mean" not in regions


async def test_search_columns_across_the_granted_catalog(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        found = await call(s, "search_columns", pattern="REGION")
        assert {(m["org"], m["super"], m["table"]) for m in found["matches"]} == {
            ("acme", "sales", "orders"),
            ("acme", "sales", "customers"),
            ("globex", "ops", "tickets"),
        }
        ids = await call(s, "search_columns", pattern="*_id", org="acme")
        assert {m["column"] for m in ids["matches"]} == {"customer_id", "staff_id"}
        typed = await call(s, "search_columns", pattern="*", org="acme", super="sales", type="int")
        assert {(m["table"], m["column"]) for m in typed["matches"]} == {
            ("orders", "id"),
            ("customers", "customer_id"),
            ("big", "x"),
        }
        assert "needs org" in await fails(s, "search_columns", pattern="x", super="sales")
    async with session(world.url, world.tokens["customers"]) as s:
        found = await call(s, "search_columns", pattern="region")
        assert [(m["table"], m["column"]) for m in found["matches"]] == [("customers", "region")]
    async with session(world.url, world.tokens["eu"]) as s:
        # the policy hides email from this reader: not even its name shows
        assert (await call(s, "search_columns", pattern="email"))["matches"] == []


async def test_resources_and_prompts(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        templates = (await s.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["schema://{org}/{super}/{table}"]
        read = await s.read_resource("schema://acme/sales/customers")
        schema = json.loads(read.contents[0].text)  # type: ignore[union-attr]
        detail = ok(world.api().get("/v1/acme/sales/tables/customers"))
        assert schema["columns"] == detail["columns"] and schema["version"] == detail["version"]
        prompts = {p.name: p for p in (await s.list_prompts()).prompts}
        assert set(prompts) == {"explore_super", "answer_question"}
        got = await s.get_prompt("answer_question", {"org": "acme", "super": "sales",
                                                     "question": "top region?"})  # fmt: skip
        text = got.messages[0].content.text  # type: ignore[union-attr]
        assert "acme/sales" in text and "top region?" in text and "validate_sql" in text
    async with session(world.url, world.tokens["customers"]) as s:
        with pytest.raises(Exception, match="not"):
            await s.read_resource("schema://acme/sales/orders")


# -- errors, authentication, tenancy and policies ----------------------------------------


async def test_errors_are_tool_errors_with_a_message(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        missing = await fails(s, "describe_table", org="acme", super="sales", table="nope")
        assert "table_not_found" in missing and "does not exist" in missing
        bad_sql = await fails(s, "query_sql", org="acme", super="sales", sql="select from")
        assert "sql" in bad_sql.lower()
        assert "give sql" in await fails(s, "query_sql", org="acme", super="sales")
        for cursor in ("not-a-cursor", encode_cursor({"offset": 3}), encode_cursor([1])):
            assert "cursor" in await fails(s, "query_sql", org="acme", super="sales", cursor=cursor)
        assert "cursor" in await fails(
            s, "list_tables", org="acme", super="sales", cursor=encode_cursor({"offset": "x"})
        )
        assert await fails(s, "sample_rows", org="acme", super="sales", table="orders", n=0)
        assert await fails(s, "list_supers")  # a required argument missing
        unknown = await s.call_tool("drop_everything", {})
        assert unknown.is_error
        limit = await fails(s, "query_sql", org="acme", super="sales", sql="select 1", limit=10**9)
        assert "invalid_limit" in limit


def test_http_needs_a_valid_bearer_token_and_points_to_the_metadata(world: World) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"accept": "application/json, text/event-stream"}
    base = world.server.base
    metadata_url = f"{base}{PRM_PATH}"
    with httpx.Client(base_url=base) as raw:
        for token, invalid in ((None, False), ("nope", True), ("llt_x_y", True)):
            auth = {"authorization": f"Bearer {token}"} if token else {}
            r = raw.post("/mcp", json=body, headers={**headers, **auth})
            assert r.status_code == 401
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith("Bearer ")
            assert f'resource_metadata="{metadata_url}"' in challenge
            assert ('error="invalid_token"' in challenge) is invalid
            assert r.json()["error"]["message"]
        for path in (PRM_PATH, "/.well-known/oauth-protected-resource"):
            doc = ok(raw.get(path))
            assert doc["resource"] == f"{base}/mcp"
            assert doc["bearer_methods_supported"] == ["header"]
            assert "authorization_servers" not in doc  # API tokens only: no OAuth server
        # Regression (review): two Authorization headers (the gate read one, the tools
        # the other) are refused.
        twice = raw.post("/mcp", json=body, headers=[
            ("accept", "application/json, text/event-stream"),
            ("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", "Bearer other"),
        ])  # fmt: skip
        assert twice.status_code == 400
        # Forwarded headers are not trusted for the metadata URL (set the public URL).
        spoofed = raw.post(
            "/mcp", json=body, headers={**headers, "x-forwarded-host": "evil.example"}
        )
        assert "evil" not in spoofed.headers["www-authenticate"]
        # No SSE stream to open in stateless operation.
        got = raw.get("/mcp", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert got.status_code == 405


async def test_the_official_client_cannot_connect_with_a_bad_token(world: World) -> None:
    with pytest.raises(BaseException) as refused:
        async with session(world.url, "bad-token") as s:
            await s.list_tools()
    # (the SDK client reports the HTTP 401 as an error response; the raw test above
    # shows the status and the challenge)
    assert "MCPError: Server returned an error response" in leaves(refused.value)


async def test_a_revoked_token_stops_at_once(world: World) -> None:
    admin = world.api()
    token = principal(admin, f"temp-{uuid.uuid4().hex[:6]}", "acme", {"role": "reader"})
    world.tokens["temp"] = token
    token_id = ok(world.api("temp").get("/v1/whoami"))["token_id"]
    async with session(world.url, token) as s:
        assert (await call(s, "list_orgs"))["orgs"][0]["name"] == "acme"
        ok(admin.delete(f"/v1/tokens/{token_id}"))
        with pytest.raises(BaseException) as refused:
            await s.call_tool("list_orgs", {})
    assert "MCPError" in leaves(refused.value)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert world.api("temp").post("/mcp", json=body).status_code == 401


async def test_tenancy_grants_and_row_policies_apply_to_every_tool(world: World) -> None:
    eu_api = world.api("eu")
    async with session(world.url, world.tokens["eu"]) as s:
        assert [o["name"] for o in (await call(s, "list_orgs"))["orgs"]] == ["acme"]
        for tool, args in (
            ("list_supers", {"org": "globex"}),
            ("describe_table", {"org": "globex", "super": "ops", "table": "tickets"}),
            ("query_sql", {"org": "globex", "super": "ops", "sql": "select 1"}),
            ("list_events", {"org": "globex"}),
        ):
            assert "not" in await fails(s, tool, **args), tool
        rows = await call(s, "query_sql", org="acme", super="sales",
                          sql="select * from orders order by id")  # fmt: skip
        assert rows["rows"] == api_rows(eu_api, "select * from orders order by id")["rows"]
        assert "email" not in [c["name"] for c in rows["columns"]]
        eu = [o for o in ORDERS if o["region"] == "eu"]
        assert [r[0] for r in rows["rows"]] == [o["id"] for o in eu]
        stats = await call(s, "get_table_stats", org="acme", super="sales", table="orders")
        assert stats["row_count"] == len(eu) and "email" not in stats["columns"]
        assert stats["columns"]["region"]["distinct_estimate"] == 1
        detail = await call(s, "describe_table", org="acme", super="sales", table="orders")
        assert detail["stats"] == {} and "email" not in [c["name"] for c in detail["columns"]]
        sample = await call(s, "sample_rows", org="acme", super="sales", table="orders", n=50)
        assert {r[1] for r in sample["rows"]} == {"eu"}
        assert "email" in await fails(
            s, "sample_rows", org="acme", super="sales", table="orders", columns=["email"]
        )
        tops = await call(s, "profile_column", org="acme", super="sales", table="orders",
                          column="region")  # fmt: skip
        assert tops["top_values"] == [{"value": "eu", "count": len(eu)}]
        # Regression (review): the plan showed the optimizer pruning with the files'
        # min/max over rows the policy hides (a probe for hidden values), and the
        # policy's own filter. A policy-bound caller gets the columns, not the plan.
        plan = await call(s, "validate_sql", org="acme", super="sales",
                          sql="select id from orders where id > 119")  # fmt: skip
        assert plan["valid"] and "not shown" in plan["plan"] and "region" not in plan["plan"]
        # Regression (review): the hidden column's name showed in history and events.
        history = await call(s, "table_history", org="acme", super="sales", table="orders")
        assert all("email" not in e["columns_added"] for e in history["entries"])
        assert any(e["columns_added"] for e in history["entries"])
        events = await call(s, "list_events", org="acme", super="sales", table="orders")
        assert "email" not in json.dumps(events["events"])
        assert all("policies" not in e for e in events["events"])
    async with session(world.url, world.tokens["customers"]) as s:
        listed = await call(s, "list_tables", org="acme", super="sales")
        assert [t["name"] for t in listed["tables"]] == ["customers"]
        refused = await fails(s, "query_sql", org="acme", super="sales",
                              sql="select count(*) from orders")  # fmt: skip
        api_error = (
            world.api("customers")
            .post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"})
            .json()["error"]
        )
        assert api_error["code"] in refused and api_error["message"] in refused
        assert "not" in await fails(s, "describe_table", org="acme", super="sales", table="big")
        assert "not" in await fails(s, "get_super_meta", org="acme", super="hr")
    # The audit names the principal for queries made through MCP.
    audited = ok(world.api().get("/v1/audit", params={"org": "acme", "kind": "query"}))
    who = {e["principal"] for e in audited["entries"]}
    eu_id = ok(eu_api.get("/v1/whoami"))["principal"]["id"]
    assert eu_id in who


# -- the response budget --------------------------------------------------------------------


async def test_results_past_the_budget_are_cut_and_say_how_to_continue(
    redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, tmp_path / "data", mcp_token_budget=1000)
    async with serving(settings) as server:
        seed(server)
        url = server.base + "/mcp"
        sql = "select * from orders order by id"
        want = api_rows(server.http, sql)["rows"]
        async with session(url, ADMIN_TOKEN) as s:
            got: list[Any] = []
            page = await call(s, "query_sql", org="acme", super="sales", sql=sql)
            pages = 1
            while True:
                assert estimate_tokens(page) <= 1000
                got += page["rows"]
                if "next_cursor" not in page:
                    break
                assert page["truncated"] and "response budget of 1000 tokens" in page["note"]
                assert "LIMIT" in page["note"]
                page = await call(s, "query_sql", org="acme", super="sales",
                                  cursor=page["next_cursor"])  # fmt: skip
                pages += 1
            assert got == want and pages > 3
            # A limit is the page size, kept by the cursor (and cut further by the budget).
            limited: list[Any] = []
            page = await call(s, "query_sql", org="acme", super="sales", sql=sql, limit=7)
            while True:
                assert 0 < len(page["rows"]) <= 7
                limited += page["rows"]
                if "next_cursor" not in page:
                    break
                page = await call(s, "query_sql", org="acme", super="sales",
                                  cursor=page["next_cursor"])  # fmt: skip
            assert limited == want
            # A cursor is bound to its super and its query.
            first = await call(s, "query_sql", org="acme", super="sales", sql=sql)
            assert "another" in await fails(
                s, "query_sql", org="acme", super="hr", cursor=first["next_cursor"]
            )
            # A row larger than the whole budget: none shown, and the hint says why.
            wide = "select repeat('y', 9000) as w from orders"
            huge = await call(s, "query_sql", org="acme", super="sales", sql=wide, limit=2)
            assert huge["rows"] == [] and "single row is larger" in huge["note"]
            # Lists shrink to fit and keep an exact cursor.
            for i in range(30):
                ok(server.http.post("/v1/acme/sales/tables/tiny/rows", json=[{"i": i}]))
            events = await call(s, "list_events", org="acme", super="sales", limit=200)
            assert estimate_tokens(events) <= 1000 and events["limit"] < 200
            params = {"org": "acme", "super": "sales", "limit": events["limit"]}
            api_page = ok(server.http.get("/v1/events", params=params))
            assert events["next_after"] == api_page["next_after"]
            # Regression (review): answers that a tool does not page (stats, profiles,
            # plans) went past the budget with long values: they are cut, and say so.
            long_text = [{"k": i, "text": "z" * 9000 + str(i)} for i in range(3)]
            ok(server.http.post("/v1/acme/sales/tables/long/rows", json=long_text))
            for tool, extra in (("get_table_stats", {}), ("profile_column", {"column": "text"}),
                                ("describe_table", {})):  # fmt: skip
                got = await call(s, tool, org="acme", super="sales", table="long", **extra)
                assert estimate_tokens(got) <= 1000, tool
                if tool != "describe_table":
                    assert "were cut" in got["note"], got
            # Regression (review): get_super_meta and search_columns gave cursors they
            # did not take: every page is reachable now.
            for i in range(40):
                ok(server.http.post(f"/v1/acme/many/tables/table_number_{i:02}/rows",
                                    json=[{f"column_of_table_{i:02}": i}]))  # fmt: skip
            for tool, args, key in (
                ("get_super_meta", {"org": "acme", "super": "many"}, "tables"),
                ("search_columns", {"pattern": "column_of", "org": "acme"}, "matches"),
            ):
                seen: list[Any] = []
                page = await call(s, tool, **args)
                while True:
                    assert estimate_tokens(page) <= 1000
                    seen += page[key]
                    if "next_cursor" not in page:
                        break
                    page = await call(s, tool, **args, cursor=page["next_cursor"])
                assert len(seen) == 40 and len({json.dumps(x) for x in seen}) == 40, tool
            first = await call(s, "search_columns", pattern="column_of", org="acme")
            assert "other arguments" in await fails(
                s, "search_columns", pattern="table", org="acme", cursor=first["next_cursor"]
            )
            # Past the budget the text returned is what the budget counts (compact JSON).
            result = await s.call_tool("query_sql", {"org": "acme", "super": "sales", "sql": sql})
            assert len(text_of(result)) <= 4 * 1000


async def test_a_result_within_its_limit_says_there_is_more(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        sql = "select id from orders order by id"
        page = await call(s, "query_sql", org="acme", super="sales", sql=sql, limit=5)
        assert page["rows"] == [[i] for i in range(1, 6)] and page["truncated"]
        assert "more rows than the 5 returned" in page["note"]
        more = await call(s, "query_sql", org="acme", super="sales", cursor=page["next_cursor"])
        assert more["rows"] == [[i] for i in range(6, 11)]


# -- concurrency and time limits ------------------------------------------------------------

SLOW = "select count(*) from big a, big b, big c where a.x + b.x + c.x = -1"


async def wait_until(predicate: Any, what: str) -> None:
    """Wait for a condition the server's thread brings about (polled; at most 30 s)."""
    with anyio.fail_after(30):
        while not predicate():  # noqa: ASYNC110 (a count in the server's thread: no event)
            await anyio.sleep(0.01)


async def test_concurrency_is_limited_per_principal_and_overall(
    redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_url, tmp_path / "data", mcp_max_concurrent=2, mcp_max_concurrent_per_principal=1,
        mcp_timeout_s=4.0,
    )  # fmt: skip
    async with serving(settings) as server:
        tokens = seed(server)
        url = server.base + "/mcp"
        limiter = server.app.state.mcp.limiter
        slow_results: list[str] = []

        async def slow(token: str) -> None:
            async with session(url, token) as s:
                result = await s.call_tool(
                    "query_sql", {"org": "acme", "super": "sales", "sql": SLOW, "timeout_s": 3}
                )
                slow_results.append(text_of(result))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow, tokens["admin"])
            await wait_until(lambda: limiter.running == 1, "1 call")
            async with session(url, tokens["admin"]) as s:
                refused = await fails(s, "whoami")
                assert "limit per principal" in refused
            async with session(url, tokens["eu"]) as s:  # another principal still may
                assert (await call(s, "whoami"))["principal"]["name"] == "eu-analyst"
            tg.start_soon(slow, tokens["us"])
            await wait_until(lambda: limiter.running == 2, "2 calls")
            async with session(url, tokens["globex"]) as s:
                assert "limit of 2" in await fails(s, "whoami")
        assert len(slow_results) == 2 and all("timeout" in t for t in slow_results)
        assert limiter.running == 0 and not limiter.by_principal
        async with session(url, tokens["admin"]) as s:  # every slot came back
            assert (await call(s, "whoami"))["principal"]["admin"]


async def test_a_call_past_its_time_is_stopped_with_a_clear_error(
    redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, tmp_path / "data", mcp_timeout_s=1.5)
    async with serving(settings) as server:
        seed(server)
        async with session(server.base + "/mcp", ADMIN_TOKEN) as s:
            # asks for 60 s; the call's own limit (1.5 s) wins
            text = await fails(s, "query_sql", org="acme", super="sales", sql=SLOW, timeout_s=60)
            assert "timeout of 1s" in text  # the call's 1.5 s less the margin for the reply
            assert (await call(s, "query_sql", org="acme", super="sales",
                               sql="select count(*) from big"))["rows"] == [[3000]]  # fmt: skip


async def test_the_call_deadline_stops_a_call_whose_api_does_not_answer() -> None:
    """The backstop for calls other than queries: an API that accepts the connection
    and never answers (a real socket) ends in a timeout tool error, and frees the slot."""

    class Ctx:
        headers = {"authorization": "Bearer some-token"}

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        held: list[Any] = []

        async def accept(stream: Any) -> None:
            held.append(stream)  # read nothing, answer nothing
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, accept)
            backend = Backend(McpConfig(timeout_s=0.3))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                backend.client = client
                with pytest.raises(ToolError, match=r"longer than 0.3s"):
                    async with backend.call(Ctx()) as api:  # type: ignore[arg-type]
                        await api.get("/v1/whoami")
            assert backend.limiter.running == 0
            tg.cancel_scope.cancel()


async def test_concurrent_calls_all_get_their_own_answer(world: World) -> None:
    async def one(token: str, i: int, out: dict[tuple[str, int], Any]) -> None:
        async with session(world.url, token) as s:
            sql = f"select count(*) from orders where id <= {i * 10}"
            out[(token, i)] = (await call(s, "query_sql", org="acme", super="sales", sql=sql))[
                "rows"
            ]

    results: dict[tuple[str, int], Any] = {}
    async with anyio.create_task_group() as tg:
        for token in (ADMIN_TOKEN, world.tokens["eu"]):
            for i in range(1, 5):
                tg.start_soon(one, token, i, results)
    eu = [o["id"] for o in ORDERS if o["region"] == "eu"]
    for i in range(1, 5):
        assert results[(ADMIN_TOKEN, i)] == [[i * 10]]
        assert results[(world.tokens["eu"], i)] == [[sum(1 for x in eu if x <= i * 10)]]


# -- stdio and the standalone HTTP server ---------------------------------------------------


def stdio_params(world: World, token: str | None) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERLAKE_")}
    env["LEDGERLAKE_URL"] = world.server.base
    if token:
        env["LEDGERLAKE_TOKEN"] = token
    ledgerlake = str(Path(sys.executable).parent / "ledgerlake")
    return StdioServerParameters(command=ledgerlake, args=["mcp"], env=env)


async def test_stdio_serves_the_same_tools_through_the_api(world: World) -> None:
    async with session(world.url, ADMIN_TOKEN) as s:
        over_http = {t.name: t.input_schema for t in (await s.list_tools()).tools}
    async with (
        stdio_client(stdio_params(world, world.tokens["eu"])) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        assert {t.name: t.input_schema for t in (await s.list_tools()).tools} == over_http
        rows = await call(s, "query_sql", org="acme", super="sales",
                          sql="select id, region from orders order by id")  # fmt: skip
        want = api_rows(world.api("eu"), "select id, region from orders order by id")
        assert rows["rows"] == want["rows"] and {r[1] for r in rows["rows"]} == {"eu"}
        assert (await call(s, "whoami"))["principal"]["name"] == "eu-analyst"
        assert "not" in await fails(s, "list_supers", org="globex")
    async with (
        stdio_client(stdio_params(world, "llt_bad_token")) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        assert "unauthorized" in await fails(s, "list_orgs")


def test_stdio_without_a_token_stops_with_a_message(world: World) -> None:
    import subprocess

    params = stdio_params(world, None)
    done = subprocess.run(
        [params.command, *params.args], env=params.env, capture_output=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode != 0 and b"LEDGERLAKE_TOKEN" in done.stderr


async def test_standalone_http_server_passes_each_callers_token(world: World) -> None:
    app = standalone_app(world.settings, world.server.base)
    standalone = ThreadedServer(app)
    standalone.start(ready_path=PRM_PATH)
    try:
        url = standalone.base + "/mcp"
        async with session(url, world.tokens["customers"]) as s:
            listed = await call(s, "list_tables", org="acme", super="sales")
            assert [t["name"] for t in listed["tables"]] == ["customers"]
            assert "not" in await fails(s, "describe_table", org="acme", super="sales",
                                        table="orders")  # fmt: skip
        async with session(url, ADMIN_TOKEN) as s:
            assert (await call(s, "list_tables", org="acme", super="sales"))["total"] == 3
        r = standalone.http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401
        assert f'resource_metadata="{standalone.base}{PRM_PATH}"' in r.headers["www-authenticate"]
    finally:
        standalone.stop()


def test_raw_json_rpc_needs_no_session(world: World) -> None:
    """What the README shows with curl: one POST per call, no initialize, no session."""
    headers = {"accept": "application/json, text/event-stream"}
    sql = "select count(*) from orders"
    arguments = {"org": "acme", "super": "sales", "sql": sql}
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "query_sql", "arguments": arguments}}  # fmt: skip
    r = world.api("eu").post("/mcp", json=body, headers=headers)
    assert r.status_code == 200 and "mcp-session-id" not in r.headers
    result = r.json()["result"]
    eu = sum(1 for o in ORDERS if o["region"] == "eu")
    assert result["isError"] is False and result["structuredContent"]["rows"] == [[eu]]


def test_prm_lists_the_configured_authorization_servers(redis_url: str, tmp_path: Path) -> None:
    from litestar.testing import TestClient

    settings = make_settings(
        redis_url, tmp_path / "data", public_url="https://lake.example.com/",
        mcp_authorization_servers="https://idp.example.com, https://idp2.example.com",
        jwt_required_scopes="lake.read",
    )  # fmt: skip
    with TestClient(create_app(settings, redis_url)) as c:
        doc = c.get(PRM_PATH).json()
        unauthorised = c.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert doc["resource"] == "https://lake.example.com/mcp"
    assert doc["authorization_servers"] == ["https://idp.example.com", "https://idp2.example.com"]
    assert doc["scopes_supported"] == ["lake.read"]
    assert unauthorised.status_code == 401
    assert (
        'resource_metadata="https://lake.example.com/.well-known/oauth-protected-resource/mcp"'
        in unauthorised.headers["www-authenticate"]
    )
    assert msgspec.json.decode(unauthorised.content)["error"]["code"] == "unauthorized"


async def test_a_jwt_from_the_identity_provider_works_over_mcp(
    redis_url: str, tmp_path: Path
) -> None:
    import time

    import jwt

    secret, issuer, audience = "mcp-jwt-secret-0123456789abcdef0123", "https://idp.example", "ll"
    settings = make_settings(
        redis_url, tmp_path / "data", jwt_hs256_secret=secret, jwt_issuer=issuer,
        jwt_audience=audience,
    )  # fmt: skip
    async with serving(settings) as server:
        ok(server.http.post("/v1/acme/sales/tables/t/rows", json=[{"a": 1}, {"a": 2}]))
        pid = ok(server.http.post("/v1/principals", json={
            "name": "alice", "org": "acme", "external_id": "alice@idp"}))["id"]  # fmt: skip
        ok(server.http.post("/v1/grants", json={"principal_id": pid, "org": "acme",
                                                 "role": "reader"}))  # fmt: skip

        def token(**extra: Any) -> str:
            claims = {"sub": "alice@idp", "iss": issuer, "aud": audience,
                      "exp": int(time.time()) + 300, **extra}  # fmt: skip
            return jwt.encode(claims, secret, algorithm="HS256")

        async with session(server.base + "/mcp", token()) as s:
            assert (await call(s, "whoami"))["principal"]["id"] == pid
            got = await call(s, "query_sql", org="acme", super="sales", sql="select sum(a) from t")
            assert got["rows"] == [[3]]
        # The metadata names the identity provider as the authorization server.
        doc = ok(server.http.get(PRM_PATH))
        assert doc["authorization_servers"] == [issuer]
        expired = token(exp=int(time.time()) - 10)
        r = server.http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                             headers={"authorization": f"Bearer {expired}"})  # fmt: skip
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
