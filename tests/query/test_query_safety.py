"""SQL through POST /v1/{org}/{super}/query: anything but one read-only SELECT over the
super's own tables is a 400 that changes nothing; limits and timeouts hold; legitimate
queries and the CSV / Arrow result formats keep working."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import redis
from litestar.testing import TestClient

from app.settings import Settings
from tests.conftest import authed

ORG, SUP, OTHER_SUP = "acme", "sales", "hr"
QUERY = f"/v1/{ORG}/{SUP}/query"
ARROW = "application/vnd.apache.arrow.stream"

ORDERS = [
    {"id": 1, "customer_id": 1, "amount": 10.0},
    {"id": 2, "customer_id": 1, "amount": 20.0},
    {"id": 3, "customer_id": 2, "amount": 5.5},
    {"id": 4, "customer_id": 3, "amount": 7.25},
]
CUSTOMERS = [
    {"id": 1, "name": "ann"},
    {"id": 2, "name": 'bob "the, builder"'},  # quotes and a comma, for CSV
    {"id": 3, "name": "cy"},
    {"id": 4, "name": "dee"},  # no orders
]
SECRET = "TOPSECRET-salary-data"
OUTSIDE_SECRET = "OUTSIDE-the-catalog"
REJECTED = {"query_forbidden", "sql_not_select"}


@dataclass(frozen=True)
class Catalog:
    client: TestClient[Any]
    settings: Settings
    other_super_file: Path  # a data file of acme/hr, in the same storage root
    outside_file: Path  # a Parquet file outside the catalog
    scratch: Path  # where an escaped COPY/ATTACH/EXPORT would write


def write(client: TestClient[Any], path: str, rows: list[dict[str, Any]]) -> None:
    r = client.post(path, json=rows)
    assert r.status_code == 200, r.text


@pytest.fixture
def catalog(client: TestClient[Any], settings: Settings, tmp_path: Path) -> Catalog:
    write(client, f"/v1/{ORG}/{SUP}/tables/orders/rows", ORDERS)
    write(client, f"/v1/{ORG}/{SUP}/tables/customers/rows", CUSTOMERS)
    write(client, f"/v1/{ORG}/{OTHER_SUP}/tables/salaries/rows", [{"who": "ann", "s": SECRET}])
    other = sorted((settings.storage_root / ORG / OTHER_SUP).rglob("*.parquet"))
    assert len(other) == 1
    outside = tmp_path / "outside" / "secret.parquet"
    outside.parent.mkdir()
    pq.write_table(pa.table({"x": [OUTSIDE_SECRET]}), outside)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Catalog(client, settings, other[0].resolve(), outside.resolve(), scratch)


def run(client: TestClient[Any], sql: str, **extra: Any) -> Any:
    return client.post(QUERY, json={"sql": sql, **extra})


def rows_of(client: TestClient[Any], sql: str, **extra: Any) -> list[list[Any]]:
    r = run(client, sql, **extra)
    assert r.status_code == 200, r.text
    return list(r.json()["rows"])


def state(cat: Catalog) -> tuple[Any, ...]:
    """Events, files and table contents: what a rejected query must not change. (The
    read audit records every query, refused ones too: that stream is left out.)"""
    settings = cat.settings
    assert settings.redis_url
    r = redis.Redis.from_url(settings.redis_url)
    try:
        streams = {
            key: [i for i, _ in r.xrange(key)]
            for key in r.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)
            if r.type(key) == b"stream" and not key.endswith(b"{audit}:reads")
        }
    finally:
        r.close()
    streams = {k: v for k, v in streams.items() if v}
    root = settings.data_dir.parent
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    events = cat.client.get("/v1/events", params={"org": ORG, "limit": 1000}).json()
    contents = (
        rows_of(cat.client, "select * from orders order by id"),
        rows_of(cat.client, "select * from customers order by id"),
    )
    return streams, files, [e["id"] for e in events["events"]], contents


def assert_rejected(response: Any, codes: set[str]) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] in codes, error
    message = error["message"]
    assert isinstance(message, str)
    assert len(message) > 10
    assert "internal" not in message.lower()
    return dict(error)


# -- forbidden statements ---------------------------------------------------------------

FORBIDDEN = {
    "read_csv_passwd": ("select * from read_csv('/etc/passwd')", REJECTED),
    "read_csv_auto_passwd": ("select * from read_csv_auto('/etc/passwd')", REJECTED),
    "read_text": ("select * from read_text('/etc/passwd')", REJECTED),
    "read_blob": ("select * from read_blob('/etc/hostname')", REJECTED),
    "glob_root": ("select * from glob('/*')", REJECTED),
    "outside_parquet": ("select * from read_parquet('{outside}')", REJECTED),
    "outside_parquet_literal": ("select * from '{outside}'", REJECTED),
    "outside_in_subquery": (
        "select * from orders where id in (select 1 from read_parquet('{outside}'))",
        REJECTED,
    ),
    "other_super_file": ("select * from read_parquet('{other}')", REJECTED),
    "other_super_literal": ("select * from '{other}'", REJECTED),
    "other_super_metadata": ("select * from parquet_metadata('{other}')", REJECTED),
    "other_super_traversal": ("select * from read_parquet('{traversal}')", REJECTED),
    "other_super_glob": ("select * from read_parquet('{root}/**/*.parquet')", REJECTED),
    "copy_table_to": ("copy orders to '{scratch}/out.csv'", REJECTED),
    "copy_query_to": ("copy (select * from orders) to '{scratch}/out.parquet'", REJECTED),
    "attach": ("attach '{scratch}/x.db' as x", REJECTED),
    "export_database": ("export database '{scratch}/export'", REJECTED),
    "install_httpfs": ("install httpfs", REJECTED),
    "load_httpfs": ("load httpfs", REJECTED),
    "set_threads": ("set threads=1", REJECTED),
    "unlock_configuration": ("set lock_configuration = false", REJECTED),
    "enable_external_access": ("set enable_external_access = true", REJECTED),
    "pragma_version": ("pragma version", REJECTED),
    "call_pragma_version": ("call pragma_version()", REJECTED),
    "two_statements": ("select 1; select 2", {"sql_multiple_statements"}),
    "select_then_drop": ("select 1; drop view orders", {"sql_multiple_statements"}),
    "insert": ("insert into orders values (9, 9, 9.0)", REJECTED),
    "create_table": ("create table t as select 1 as x", REJECTED),
    "create_view": ("create view v as select * from orders", REJECTED),
    "drop_view": ("drop view orders", REJECTED),
    "update": ("update orders set amount = 0", REJECTED),
    "delete": ("delete from orders", REJECTED),
    "describe": ("describe orders", REJECTED),
    "show_tables": ("show tables", REJECTED),
    "show_table": ("show orders", REJECTED),
}


@pytest.mark.parametrize(("sql", "codes"), list(FORBIDDEN.values()), ids=list(FORBIDDEN))
def test_forbidden_sql_is_400_and_changes_nothing(
    catalog: Catalog, sql: str, codes: set[str]
) -> None:
    root = catalog.settings.storage_root.resolve()
    own_dir = next((root / ORG / SUP / "orders").rglob("*.parquet")).parent
    sql = sql.format(
        outside=catalog.outside_file,
        other=catalog.other_super_file,
        traversal=f"{own_dir}/../../../{OTHER_SUP}/salaries/data/{catalog.other_super_file.name}",
        root=root,
        scratch=catalog.scratch,
    )
    before = state(catalog)
    r = run(catalog.client, sql)
    assert_rejected(r, codes)
    for leaked in ("root:", SECRET, OUTSIDE_SECRET):
        assert leaked not in r.text
    assert list(catalog.scratch.iterdir()) == []  # nothing written by COPY/ATTACH/EXPORT
    assert state(catalog) == before


def test_tables_of_another_super_are_not_visible_by_name(catalog: Catalog) -> None:
    r = run(catalog.client, "select * from salaries")
    error = assert_rejected(r, {"sql_error"})
    assert "salaries" in error["message"]
    assert SECRET not in r.text
    # while that super itself can read them
    other = catalog.client.post(
        f"/v1/{ORG}/{OTHER_SUP}/query", json={"sql": "select s from salaries"}
    )
    assert other.status_code == 200, other.text
    assert other.json()["rows"] == [[SECRET]]


def test_unknown_table_is_sql_error(catalog: Catalog) -> None:
    before = state(catalog)
    error = assert_rejected(run(catalog.client, "select * from no_such_table"), {"sql_error"})
    assert "no_such_table" in error["message"]
    assert state(catalog) == before


@pytest.mark.parametrize(
    ("sql", "code"),
    [("", "sql_empty"), ("   \n ", "sql_empty"), ("selec 1", "sql_syntax"),
     ("select from where", "sql_syntax")],
    ids=["empty", "blank", "typo", "garbage"],
)  # fmt: skip
def test_empty_or_unparsable_sql_is_400(catalog: Catalog, sql: str, code: str) -> None:
    assert_rejected(run(catalog.client, sql), {code})


# -- row limit --------------------------------------------------------------------------


@pytest.fixture
def big(client: TestClient[Any]) -> TestClient[Any]:
    """acme/sales/big with 1500 rows."""
    write(client, f"/v1/{ORG}/{SUP}/tables/big/rows", [{"n": i} for i in range(1500)])
    return client


def test_default_row_limit_truncates(big: TestClient[Any], settings: Settings) -> None:
    assert settings.query_default_limit == 1000
    r = run(big, "select n from big order by n")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["row_count"] == 1000
    assert body["truncated"] is True
    assert body["rows"] == [[i] for i in range(1000)]
    assert r.headers["x-ledgerlake-truncated"] == "true"
    assert r.headers["x-ledgerlake-row-count"] == "1000"


@pytest.mark.parametrize(
    ("sql", "limit", "count", "truncated"),
    [
        ("select n from big where n < 1000", None, 1000, False),  # exactly the limit
        ("select n from big", 1500, 1500, False),
        ("select n from big", 1499, 1499, True),
        ("select n from big", 1, 1, True),
    ],
    ids=["exactly_default", "limit_equals_rows", "one_short", "one"],
)
def test_explicit_limits(
    big: TestClient[Any], sql: str, limit: int | None, count: int, truncated: bool
) -> None:
    extra = {} if limit is None else {"limit": limit}
    r = run(big, sql, **extra)
    assert r.status_code == 200, r.text
    assert (r.json()["row_count"], len(r.json()["rows"])) == (count, count)
    assert r.json()["truncated"] is truncated


@pytest.mark.parametrize("accept", ["text/csv", ARROW])
def test_row_limit_applies_to_csv_and_arrow(big: TestClient[Any], accept: str) -> None:
    r = big.post(QUERY, json={"sql": "select n from big order by n"}, headers={"accept": accept})
    assert r.status_code == 200, r.text
    if accept == ARROW:
        table = pa.ipc.open_stream(r.content).read_all()
    else:
        table = pacsv.read_csv(io.BytesIO(r.content))
    assert table.column("n").to_pylist() == list(range(1000))
    assert r.headers["x-ledgerlake-truncated"] == "true"


def test_limit_above_the_maximum_is_400(big: TestClient[Any], settings: Settings) -> None:
    r = run(big, "select n from big", limit=settings.query_max_limit + 1)
    error = assert_rejected(r, {"invalid_limit"})
    assert str(settings.query_max_limit) in error["message"]
    assert run(big, "select 1", limit=settings.query_max_limit).status_code == 200


@pytest.mark.parametrize("limit", [0, -1])
def test_non_positive_limit_is_400(big: TestClient[Any], limit: int) -> None:
    assert_rejected(run(big, "select n from big", limit=limit), {"invalid_limit"})


# -- timeout ----------------------------------------------------------------------------

SLOW = "select count(*) from range(100000000) a, range(100000) b"


def test_slow_query_times_out_and_the_server_recovers(catalog: Catalog) -> None:
    before = state(catalog)
    started = time.perf_counter()
    r = run(catalog.client, SLOW, timeout_s=0.5)
    elapsed = time.perf_counter() - started
    assert r.status_code == 408, r.text
    error = r.json()["error"]
    assert error["code"] == "query_timeout"
    assert "0.5" in error["message"]
    assert elapsed < 5, f"the query was not interrupted in time ({elapsed:.1f}s)"
    # the server still answers, promptly
    assert rows_of(catalog.client, "select 1 as one") == [[1]]
    assert rows_of(catalog.client, "select count(*) from orders") == [[len(ORDERS)]]
    assert state(catalog) == before


@pytest.mark.parametrize("timeout_s", [0, -1, "max+1"])
def test_invalid_timeout_is_400(catalog: Catalog, timeout_s: Any) -> None:
    if timeout_s == "max+1":
        timeout_s = catalog.settings.query_max_timeout_s + 1
    assert_rejected(run(catalog.client, "select 1", timeout_s=timeout_s), {"invalid_timeout"})


# -- legitimate queries -----------------------------------------------------------------

LEGIT = {
    "cte": (
        "with large as (select * from orders where amount > 6) select count(*) as n from large",
        [[3]],
    ),
    "nested_cte": (
        "with a as (select customer_id, amount from orders), "
        "b as (select customer_id, sum(amount) as t from a group by customer_id) "
        "select customer_id, t from b order by customer_id",
        [[1, 30.0], [2, 5.5], [3, 7.25]],
    ),
    "union_all": (
        "select name from customers where id = 1 union all "
        "select name from customers where id = 3 order by name",
        [["ann"], ["cy"]],
    ),
    "union_dedup": ("select customer_id from orders union select 1 order by 1", [[1], [2], [3]]),
    "subquery_in": (
        "select name from customers where id in "
        "(select customer_id from orders where amount >= 20) order by name",
        [["ann"]],
    ),
    "subquery_from": (
        "select max(t) from (select sum(amount) as t from orders group by customer_id) s",
        [[30.0]],
    ),
    "scalar_subquery": (
        "select id from orders where amount = (select max(amount) from orders)",
        [[2]],
    ),
    "join": (
        "select c.name, sum(o.amount) as total from orders o "
        "join customers c on c.id = o.customer_id group by c.name order by total desc",
        [["ann", 30.0], ["cy", 7.25], ['bob "the, builder"', 5.5]],
    ),
    "left_join": (
        "select c.id, count(o.id) as n from customers c "
        "left join orders o on o.customer_id = c.id group by c.id order by c.id",
        [[1, 2], [2, 1], [3, 1], [4, 0]],
    ),
    "aggregates": (
        "select count(*), sum(id), min(amount), max(amount), avg(amount) from orders",
        [[4, 10, 5.5, 20.0, 10.6875]],
    ),
    "group_having": (
        "select customer_id, count(*) from orders group by customer_id having count(*) > 1",
        [[1, 2]],
    ),
    "window": (
        "select id, row_number() over (order by amount desc) as r from orders order by id",
        [[1, 2], [2, 1], [3, 4], [4, 3]],
    ),
    "leading_comment_and_semicolon": ("/* hi */ select count(*) from orders;", [[4]]),
    # DuckDB sees one statement here; a comment after the semicolon is not a second one
    "comment_after_semicolon": ("select count(*) from orders; -- the total", [[4]]),
}


@pytest.mark.parametrize(("sql", "expected"), list(LEGIT.values()), ids=list(LEGIT))
def test_legitimate_queries_work(catalog: Catalog, sql: str, expected: list[list[Any]]) -> None:
    assert rows_of(catalog.client, sql) == expected


def test_json_result_describes_columns(catalog: Catalog) -> None:
    r = run(catalog.client, "select id, amount, name from orders join customers using (id)")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["columns"] == [
        {"name": "id", "type": "int64"},
        {"name": "amount", "type": "float64"},
        {"name": "name", "type": "string"},
    ]
    assert body["row_count"] == len(body["rows"]) == 4
    assert body["truncated"] is False
    assert body["elapsed_ms"] >= 0


# -- result formats ---------------------------------------------------------------------

FORMAT_SQL = (
    "select o.id, o.amount, c.name from orders o join customers c on c.id = o.customer_id "
    "order by o.id"
)


def test_csv_result_parses_back_to_the_same_data(catalog: Catalog) -> None:
    expected = run(catalog.client, FORMAT_SQL).json()
    r = catalog.client.post(QUERY, json={"sql": FORMAT_SQL}, headers={"accept": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    table = pacsv.read_csv(io.BytesIO(r.content))
    assert table.column_names == [c["name"] for c in expected["columns"]]
    rows = [list(row.values()) for row in table.to_pylist()]
    assert rows == expected["rows"]
    assert r.headers["x-ledgerlake-row-count"] == str(len(rows))
    assert r.headers["x-ledgerlake-truncated"] == "false"


def test_arrow_result_parses_back_to_the_same_data(catalog: Catalog) -> None:
    sql = (
        "select c.id, c.name, sum(o.amount) as total from customers c "
        "left join orders o on o.customer_id = c.id group by c.id, c.name order by c.id"
    )
    expected = run(catalog.client, sql).json()
    assert [None] in [[row[2]] for row in expected["rows"]]  # includes a NULL
    r = catalog.client.post(QUERY, json={"sql": sql}, headers={"accept": ARROW})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(ARROW)
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.column_names == [c["name"] for c in expected["columns"]]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("name").type in (pa.string(), pa.large_string(), pa.string_view())
    assert [list(row.values()) for row in table.to_pylist()] == expected["rows"]
    assert r.headers["x-ledgerlake-row-count"] == str(table.num_rows)


def test_forbidden_sql_is_rejected_in_every_format(catalog: Catalog) -> None:
    for accept in ("application/json", "text/csv", ARROW):
        r = catalog.client.post(
            QUERY,
            json={"sql": "select * from read_csv('/etc/passwd')"},
            headers={"accept": accept},
        )
        assert_rejected(r, REJECTED)
        assert "root:" not in r.text


# -- engine state, resources and odd values ----------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "select current_setting('allowed_paths')",
        "select * from duckdb_settings()",
        "select * from duckdb_secrets()",
        "select * from enable_logging()",
        "select enable_profiling()",
        "select * from orders, lateral (select * from disable_logging())",
        "select * from query('select current_setting(''temp_directory'')')",
        "select * from query_table('orders')",
    ],
)
def test_engine_state_functions_are_refused(catalog: Catalog, sql: str) -> None:
    error = assert_rejected(run(catalog.client, sql), {"query_forbidden"})
    assert "not available" in error["message"]


def test_a_table_the_query_does_not_name_is_not_readable(catalog: Catalog) -> None:
    """Only the named tables' files are allowed, even within the same super."""
    orders_file = next((catalog.settings.storage_root / ORG / SUP / "orders" / "data").iterdir())
    sql = f"select * from customers, read_parquet('{orders_file}')"
    assert_rejected(run(catalog.client, sql), {"query_forbidden"})


def test_overlong_and_deeply_nested_sql_is_400(catalog: Catalog) -> None:
    long_sql = "select 1 where 1 in (" + ",".join(["1"] * 60_000) + ")"
    r = run(catalog.client, long_sql)
    assert r.status_code == 400 and r.json()["error"]["code"] == "sql_too_long"
    nested = "select " + "(" * 3000 + "1" + ")" * 3000
    r = run(catalog.client, nested)
    assert r.status_code == 400, r.text
    assert rows_of(catalog.client, "select count(*) from orders") == [[4]]  # still serving


def test_infinite_dates_and_timestamps_come_back_as_text(catalog: Catalog) -> None:
    got = rows_of(
        catalog.client,
        "select 'infinity'::timestamp, '-infinity'::date, '2024-01-02'::date, count(*) from orders",
    )
    assert got == [["infinity", "-infinity", "2024-01-02", 4]]


def test_a_missing_data_file_is_503_not_a_query_error(catalog: Catalog) -> None:
    victim = next((catalog.settings.storage_root / ORG / SUP / "orders" / "data").iterdir())
    victim.unlink()
    r = run(catalog.client, "select count(*) from orders")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "data_unavailable"
    assert rows_of(catalog.client, "select count(*) from customers") == [[4]]


@pytest.mark.slow
def test_concurrent_spilling_queries_do_not_collide(settings: Settings) -> None:
    """Each query spills into its own directory (shared spill files crashed DuckDB)."""
    from concurrent.futures import ThreadPoolExecutor

    import msgspec

    from app.api.app import create_app

    small = msgspec.structs.replace(settings, query_memory_limit="64MB", query_threads=1)
    assert small.redis_url
    sql = (
        "select count(distinct s) "
        "from (select md5(range::varchar) s from range(1500000) order by s)"
    )
    with authed(TestClient(create_app(small, small.redis_url))) as c:
        write(c, f"/v1/{ORG}/{SUP}/tables/t/rows", [{"x": 1}])
        with ThreadPoolExecutor(3) as pool:
            results = list(
                pool.map(lambda _: c.post(QUERY, json={"sql": sql, "timeout_s": 120}), range(3))
            )
        assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
        assert all(r.json()["rows"] == [[1500000]] for r in results)
    spill_root = small.data_dir / "tmp" / "query"
    assert not spill_root.exists() or list(spill_root.iterdir()) == []
