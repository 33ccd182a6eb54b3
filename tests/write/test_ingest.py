"""Ingestion through the HTTP API: every body format, schema rules, versions, retries."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import msgspec
import pyarrow as pa
import pytest
from litestar.testing import AsyncTestClient, TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, authed
from tests.support.bodies import arrow_bytes, parquet_bytes
from tests.support.threaded_server import ThreadedServer

ROWS = "/v1/acme/sales/tables/orders/rows"
QUERY = "/v1/acme/sales/query"


def query(client: TestClient[Any], sql: str) -> list[list[Any]]:
    r = client.post(QUERY, json={"sql": sql})
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def test_first_write_creates_org_super_and_table(client: TestClient[Any]) -> None:
    r = client.post(ROWS, json=[{"id": 1, "amount": 9.5}, {"id": 2, "amount": 3.0}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["table"] == "orders"
    assert body["version"] == 1  # 0 = created (empty), 1 = first rows
    assert body["rows"] == 2
    assert body["event_id"]
    assert [o["name"] for o in client.get("/v1/orgs").json()["orgs"]] == ["acme"]
    assert client.get("/v1/acme/supers").json()["supers"][0]["name"] == "sales"
    assert query(client, "select sum(amount) from orders") == [[12.5]]


TABLE = pa.table({"id": pa.array([1, 2], pa.int64()), "name": ["a", "b"]})
BODIES = {
    "application/json": b'[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]',
    "application/x-ndjson": b'{"id": 1, "name": "a"}\n{"id": 2, "name": "b"}\n',
    "text/csv": b"id,name\n1,a\n2,b\n",
    "application/vnd.apache.parquet": parquet_bytes(TABLE),
    "application/vnd.apache.arrow.stream": arrow_bytes(TABLE),
}


@pytest.mark.parametrize("content_type", list(BODIES))
def test_every_body_format_lands_the_same_rows(client: TestClient[Any], content_type: str) -> None:
    r = client.post(ROWS, content=BODIES[content_type], headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert query(client, "select id, name from orders order by id") == [[1, "a"], [2, "b"]]
    detail = client.get("/v1/acme/sales/tables/orders").json()
    assert [(c["name"], c["type"]) for c in detail["columns"]] == [
        ("id", "int64"),
        ("name", "string"),
    ]


def test_every_format_appends_to_one_table(client: TestClient[Any]) -> None:
    for i, (ct, body) in enumerate(BODIES.items()):
        r = client.post(ROWS, content=body, headers={"content-type": ct})
        assert r.status_code == 200, (ct, r.text)
        assert r.json()["version"] == i + 1
    assert query(client, "select count(*), sum(id) from orders") == [[10, 15]]


def test_rich_types_round_trip(client: TestClient[Any]) -> None:
    table = pa.table({
        "ts": pa.array([1_700_000_000_000_000], pa.timestamp("us", tz="UTC")),
        "d": pa.array([pa.scalar(19000, pa.date32()).as_py()], pa.date32()),
        "price": pa.array(["12.34"], pa.string()).cast(pa.decimal128(10, 2)),
        "tags": pa.array([["x", "y"]], pa.list_(pa.string())),
        "attrs": pa.array([{"k": 1, "v": "z"}], pa.struct([("k", pa.int32()), ("v", pa.string())])),
    })  # fmt: skip
    r = client.post(ROWS, content=arrow_bytes(table),
                    headers={"content-type": "application/vnd.apache.arrow.stream"})  # fmt: skip
    assert r.status_code == 200, r.text
    detail = client.get("/v1/acme/sales/tables/orders").json()
    assert {c["name"]: c["type"] for c in detail["columns"]} == {
        "ts": "timestamp[UTC]", "d": "date", "price": "decimal(10,2)",
        "tags": "list<string>", "attrs": "struct<k: int32, v: string>",
    }  # fmt: skip
    rows = query(client, "select price, tags, attrs.v, year(ts) from orders")
    assert rows == [[12.34, ["x", "y"], "z", 2023]]


def test_new_nullable_column_is_a_schema_change(client: TestClient[Any]) -> None:
    client.post(ROWS, json=[{"id": 1}])
    r = client.post(ROWS, json=[{"id": 2, "note": "hi"}])
    assert r.json()["version"] == 3  # SchemaEvolved (2) + RowsAppended (3)
    history = client.get("/v1/acme/sales/tables/orders/history").json()["entries"]
    assert [(e["version"], e["event_type"]) for e in history] == [
        (0, "TableCreated"), (1, "RowsAppended"), (2, "SchemaEvolved"), (3, "RowsAppended"),
    ]  # fmt: skip
    assert history[2]["columns_added"] == ["note"]
    assert query(client, "select id, note from orders order by id") == [[1, None], [2, "hi"]]
    # a later write without the column is fine: it is nullable
    assert client.post(ROWS, json=[{"id": 3}]).status_code == 200


def test_all_null_column_takes_its_type_later(client: TestClient[Any]) -> None:
    client.post(ROWS, json=[{"id": 1, "maybe": None}])
    r = client.post(ROWS, json=[{"id": 2, "maybe": 5}])
    assert r.status_code == 200, r.text
    detail = client.get("/v1/acme/sales/tables/orders").json()
    assert {c["name"]: c["type"] for c in detail["columns"]}["maybe"] == "int64"
    assert query(client, "select sum(maybe) from orders") == [[5]]
    assert client.post(ROWS, json=[{"id": 3, "maybe": "x"}]).status_code == 422


def test_files_with_the_same_columns_in_another_order_read_by_name(
    client: TestClient[Any],
) -> None:
    """Files with the same, non-null columns are read without union_by_name (issue 9):
    DuckDB must still match their columns by name, whatever their order in each file."""
    client.post(ROWS, json=[{"id": 1, "name": "a", "amount": 1.5}])
    client.post(ROWS, json=[{"amount": 2.5, "name": "b", "id": 2}])
    client.post(ROWS, content=arrow_bytes(pa.table({"name": ["c"], "id": [3], "amount": [3.5]})),
                headers={"Content-Type": "application/vnd.apache.arrow.stream"})  # fmt: skip
    assert query(client, "select id, name, amount from orders order by id") == [
        [1, "a", 1.5], [2, "b", 2.5], [3, "c", 3.5],
    ]  # fmt: skip
    assert query(client, "select name from orders where id = 2") == [["b"]]


def test_overwrite_replaces_the_table(client: TestClient[Any]) -> None:
    client.post(ROWS, json=[{"id": 1}, {"id": 2}])
    r = client.post(ROWS + "?mode=overwrite", json=[{"id": 9}])
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "overwrite"
    assert query(client, "select id from orders") == [[9]]
    last = client.get("/v1/acme/sales/tables/orders/history").json()["entries"][-1]
    assert (last["event_type"], last["rows_added"], last["rows_removed"]) == (
        "TableOverwritten", 1, 2,
    )  # fmt: skip
    detail = client.get("/v1/acme/sales/tables/orders").json()
    assert (detail["row_count"], detail["file_count"]) == (1, 1)


def test_if_match_current_version_succeeds(client: TestClient[Any]) -> None:
    v = client.post(ROWS, json=[{"id": 1}]).json()["version"]
    r = client.post(ROWS, json=[{"id": 2}], headers={"If-Match": f'"{v}"'})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == v + 1
    # If-Match: -1 means "the table must not exist yet"
    r = client.post(
        "/v1/acme/sales/tables/fresh/rows", json=[{"id": 1}], headers={"If-Match": "-1"}
    )
    assert r.status_code == 200, r.text


def test_idempotent_retry_returns_the_first_result(client: TestClient[Any]) -> None:
    headers = {"Idempotency-Key": "req-1"}
    first = client.post(ROWS, json=[{"id": 1}], headers=headers).json()
    again = client.post(ROWS, json=[{"id": 1}], headers=headers).json()
    assert again == {**first, "replayed": True}
    assert query(client, "select count(*) from orders") == [[1]]


def test_reads_see_writes_through_another_api_instance(settings: Settings) -> None:
    """Read-your-writes across pods: instance B runs no projector, and still sees A's write
    the moment it returns, with no waiting."""
    assert settings.redis_url
    a = create_app(settings, settings.redis_url, run_projector=False)
    b = create_app(settings, settings.redis_url, run_projector=False)
    with authed(TestClient(a)) as ca, authed(TestClient(b)) as cb:
        for i in range(5):
            v = ca.post(ROWS, json=[{"id": i}]).json()["version"]
            assert cb.get("/v1/acme/sales/tables/orders").json()["version"] == v
            assert query(cb, "select count(*) from orders") == [[i + 1]]


def test_one_process_s_writers_of_a_table_take_turns_instead_of_failing(
    settings: Settings,
) -> None:
    """Regression: 16 writers of one table, through a real server, used to fail each
    other's compare-and-set until they ran out of retries (409 version_conflict).
    Writers of one process now take turns to commit, so none needs a retry, even with
    no retries allowed."""
    assert settings.redis_url
    server = ThreadedServer(
        create_app(msgspec.structs.replace(settings, write_retries=0), settings.redis_url),
        ADMIN_TOKEN,
    )
    server.start()
    writers, per_writer = 16, 4
    results: list[int] = []

    async def main() -> None:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        limits = httpx.Limits(max_connections=writers)
        async with httpx.AsyncClient(
            base_url=server.base, headers=headers, limits=limits, timeout=30
        ) as c:
            await c.post(ROWS, json=[{"w": -1, "i": -1}])

            async def writer(w: int) -> None:
                for i in range(per_writer):
                    r = await c.post(ROWS, json=[{"w": w, "i": i}])
                    assert r.status_code == 200, r.text
                    results.append(r.json()["version"])

            async with anyio.create_task_group() as tg:
                for w in range(writers):
                    tg.start_soon(writer, w)
            r = await c.post(QUERY, json={"sql": "select count(distinct (w, i)) from orders"})
            assert r.json()["rows"] == [[writers * per_writer + 1]]

    try:
        anyio.run(main)
    finally:
        server.stop()
    assert sorted(results) == list(range(2, 2 + writers * per_writer))


def test_writers_taking_turns_replan_when_one_of_them_moves_the_schema(
    settings: Settings,
) -> None:
    """A writer whose turn comes after another one's new column writes against the new
    schema: every row lands, with each writer's columns."""
    assert settings.redis_url
    app = create_app(settings, settings.redis_url)

    async def main() -> None:
        async with authed(AsyncTestClient(app)) as c:
            await c.post(ROWS, json=[{"w": -1}])

            async def writer(w: int) -> None:
                row: dict[str, Any] = {"w": w, f"c{w % 4}": w}
                r: httpx.Response = await c.post(ROWS, json=[row])
                assert r.status_code == 200, r.text

            async with anyio.create_task_group() as tg:
                for w in range(12):
                    tg.start_soon(writer, w)
            sql = "select w, c0, c1, c2, c3 from orders where w >= 0 order by w"
            r = await c.post(QUERY, json={"sql": sql})
            assert r.status_code == 200, r.text
            expected = [[w] + [w if k == w % 4 else None for k in range(4)] for w in range(12)]
            assert r.json()["rows"] == expected

    anyio.run(main)


def test_concurrent_appends_rebase_and_lose_nothing(settings: Settings) -> None:
    assert settings.redis_url
    app = create_app(settings, settings.redis_url)
    writers, per_writer = 8, 5
    results: list[int] = []

    async def main() -> None:
        async with authed(AsyncTestClient(app)) as c:
            await c.post(ROWS, json=[{"w": -1, "i": -1}])

            async def writer(w: int) -> None:
                for i in range(per_writer):
                    r: httpx.Response = await c.post(ROWS, json=[{"w": w, "i": i}])
                    assert r.status_code == 200, r.text
                    results.append(r.json()["version"])

            async with anyio.create_task_group() as tg:
                for w in range(writers):
                    tg.start_soon(writer, w)
            r = await c.post(
                QUERY, json={"sql": "select count(*), count(distinct (w, i)) from orders"}
            )
            assert r.json()["rows"] == [[writers * per_writer + 1, writers * per_writer + 1]]

    anyio.run(main)
    # every acknowledged write got its own version
    assert sorted(results) == list(range(2, 2 + writers * per_writer))
