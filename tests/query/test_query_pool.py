"""Pooled query connections (``projections.query.engine.ConnectionPool``): a reused DuckDB
connection never shows a query anything but the table versions and policies it asked
for, whatever was written, restricted, timed out or failed before."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
import redis
from litestar.testing import TestClient

import projections.query.pool as pool_module
from app.settings import Settings
from events.errors import Unavailable
from events.redis_log import Keys
from projections.catalog import SuperState
from projections.query.engine import QueryEngine
from projections.query.pool import ConnectionPool, Pooled
from projections.query.types import Analysis, QueryLimits, ViewSource
from projections.query.wire import End, Failure
from projections.query.workers import Worker
from tests.support.lake import assert_error, ok
from tests.support.workers import Starts

Client = TestClient[Any]
ORG, SUP = "acme", "sales"
BASE = f"/v1/{ORG}/{SUP}"


def q(client: Client, sql: str, base: str = BASE, **extra: Any) -> list[list[Any]]:
    rows: list[list[Any]] = ok(client.post(f"{base}/query", json={"sql": sql, **extra}))["rows"]
    return rows


def q_as(client: Client, token: str, sql: str) -> list[list[Any]]:
    """``sql`` with another principal's token, through the same client (and app)."""
    auth = {"Authorization": f"Bearer {token}"}
    r = client.post(f"{BASE}/query", json={"sql": sql}, headers=auth)
    rows: list[list[Any]] = ok(r)["rows"]
    return rows


def rows_url(table: str, base: str = BASE) -> str:
    return f"{base}/tables/{table}/rows"


@dataclass(frozen=True)
class Answer:
    """Which connection served a query: its worker process and serial number there."""

    pid: int
    connection: int
    reused: bool


class Watch:
    """Records, from the workers' answers, which connection served each query."""

    def __init__(self, engine: QueryEngine) -> None:
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        engine.workers.on_answer = self.answered

    def answered(self, worker: Worker, answer: End | Failure) -> None:
        with self.lock:
            self.answers.append(Answer(worker.pid, answer.connection, answer.reused))

    @property
    def hits(self) -> list[Answer]:
        """The answers of queries that ran on a kept connection."""
        return [a for a in self.answers if a.reused]


def watch(client: Client, monkeypatch: pytest.MonkeyPatch) -> Watch:
    engine = client.app.state.services.engine
    monkeypatch.setattr(engine.workers, "on_answer", None)
    return Watch(engine)


def is_closed(pooled: Pooled) -> bool:
    try:
        pooled.con.execute("select 1")
    except duckdb.ConnectionException:
        return True
    return False


def kept(engine: QueryEngine) -> int:
    """How many connections the engine's idle workers keep."""
    return sum(len(w.kept) for w in engine.workers.idle)


# -- every write is seen by the next query -----------------------------------------------


def test_every_kind_of_write_is_seen_by_the_next_query(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = watch(client, monkeypatch)
    url = rows_url("orders")

    def sees(expected: list[list[Any]], sql: str = "select * from orders order by id") -> None:
        # three times: the second and third run on the first one's pooled connection
        for _ in range(3):
            assert q(client, sql) == expected
        assert q(client, "select count(*) from orders") == [[len(expected)]]

    ok(client.post(url, json=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]))
    sees([[1, "a"], [2, "b"]])
    hits = len(w.hits)
    assert hits >= 2  # the queries above did reuse a connection

    ok(client.post(url, json=[{"id": 3, "name": "c"}]))
    sees([[1, "a"], [2, "b"], [3, "c"]])
    v_three = ok(client.get(f"{BASE}/tables/orders"))["version"]

    ok(client.post(url, params={"mode": "overwrite"}, json=[{"id": 10, "name": "x"}]))
    sees([[10, "x"]])

    ok(client.post(url, json=[{"id": 11, "name": "y"}, {"id": 12, "name": "z"}]))
    ok(client.post(f"{BASE}/tables/orders/delete", json={"keys": {"id": [11]}}))
    sees([[10, "x"], [12, "z"]])

    ok(client.post(url, params={"mode": "upsert", "key": "id"}, json=[{"id": 12, "name": "Z"}]))
    sees([[10, "x"], [12, "Z"]])

    ok(client.post(url, json=[{"id": 13, "name": "w", "note": "new"}]))  # a new column
    sees([[10, "x", None], [12, "Z", None], [13, "w", "new"]])

    ok(client.post(f"{BASE}/tables/orders/restore", json={"version": v_three}))
    sees([[1, "a"], [2, "b"], [3, "c"]])

    ok(client.delete(f"{BASE}/tables/orders"))
    gone = client.post(f"{BASE}/query", json={"sql": "select * from orders"})
    assert_error(gone, 400, "sql_error")
    # the same name, shape and row count as before the drop: only the rows differ
    ok(client.post(url, json=[{"id": 1, "name": "A"}, {"id": 2, "name": "B"}, {"id": 3}]))
    sees([[1, "A"], [2, "B"], [3, None]])
    assert len(w.hits) > hits


# -- policies ------------------------------------------------------------------------------

PEOPLE = [
    {"id": 1, "region": "eu", "email": "a@x", "ssn": "111", "amount": 10},
    {"id": 2, "region": "eu", "email": "b@x", "ssn": "222", "amount": 20},
    {"id": 3, "region": "us", "email": "c@x", "ssn": "333", "amount": 30},
    {"id": 4, "region": "apac", "email": "d@x", "ssn": "444", "amount": 40},
]
POLICY = {
    "role": "reader",
    "row_filter": "region = :principal.region",
    "hidden": ["ssn"],
    "masks": {"email": "hash"},
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class People:
    """acme/sales/people under POLICY; the admin client, and the token and principal id
    of one reader per region (eu, us). One client, so that all share one pool."""

    admin: Client
    tokens: dict[str, str]
    ids: dict[str, str]


@pytest.fixture
def people(client: Client) -> People:
    ok(client.post(rows_url("people"), json=PEOPLE))
    ok(client.put(f"{BASE}/tables/people/policies", json={"policies": [POLICY]}))
    tokens, ids = {}, {}
    for region in ("eu", "us"):
        body = {"name": region, "org": ORG, "attributes": {"region": region}}
        ids[region] = client.post("/v1/principals", json=body).json()["id"]
        grant = {"principal_id": ids[region], "role": "reader", "org": ORG}
        assert client.post("/v1/grants", json=grant).status_code == 201
        tokens[region] = client.post(f"/v1/principals/{ids[region]}/tokens", json={}).json()[
            "token"
        ]
    return People(client, tokens, ids)


def test_principals_with_different_policies_never_see_each_others_views(
    people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, eu, us = people.admin, people.tokens["eu"], people.tokens["us"]
    w = watch(admin, monkeypatch)

    def hashed(region: str) -> list[list[Any]]:
        return [
            [p["id"], p["region"], sha(str(p["email"])), p["amount"]]
            for p in PEOPLE
            if p["region"] == region
        ]

    everything = [list(p.values()) for p in PEOPLE]
    for _ in range(6):  # alternating, so every query may find another one's connection
        assert q(admin, "select * from people order by id") == everything
        assert q_as(admin, eu, "select * from people order by id") == hashed("eu")
        assert q_as(admin, us, "select * from people order by id") == hashed("us")
        assert q(admin, "select count(*), sum(amount) from people") == [[4, 100]]
        assert q_as(admin, eu, "select count(*), sum(amount) from people") == [[2, 30]]
        assert q_as(admin, us, "select count(*), sum(amount) from people") == [[1, 30]]
    assert len(w.hits) >= 3 * 5 * 2  # pooled connections did serve most of them

    # A write under the same policy: each reader's pooled view is stale.
    new = {"id": 5, "region": "eu", "email": "e@x", "ssn": "555", "amount": 50}
    ok(admin.post(rows_url("people"), json=[new]))
    for _ in range(3):
        assert q_as(admin, eu, "select count(*), sum(amount) from people") == [[3, 80]]
        assert q_as(admin, us, "select count(*), sum(amount) from people") == [[1, 30]]
        assert q(admin, "select count(*), sum(amount) from people") == [[5, 150]]

    # A new policy (email nulled, ssn visible): the readers' pooled views are stale.
    nulled = {"role": "reader", "row_filter": POLICY["row_filter"], "masks": {"email": "null"}}
    ok(admin.put(f"{BASE}/tables/people/policies", json={"policies": [nulled]}))
    for _ in range(3):
        assert q_as(admin, eu, "select * from people order by id") == [
            [1, "eu", None, "111", 10],
            [2, "eu", None, "222", 20],
            [5, "eu", None, "555", 50],
        ]
        assert q_as(admin, us, "select * from people order by id") == [[3, "us", None, "333", 30]]
        assert q(admin, "select email from people order by id") == [
            ["a@x"],
            ["b@x"],
            ["c@x"],
            ["d@x"],
            ["e@x"],
        ]


def test_a_changed_attribute_is_a_new_view(people: People) -> None:
    admin, eu, us = people.admin, people.tokens["eu"], people.tokens["us"]
    for _ in range(2):
        assert q_as(admin, eu, "select id from people order by id") == [[1], [2]]
    body = {"attributes": {"region": "apac"}}
    ok(admin.patch(f"/v1/principals/{people.ids['eu']}", json=body))
    for _ in range(2):
        assert q_as(admin, eu, "select id from people order by id") == [[4]]
        assert q_as(admin, us, "select id from people order by id") == [[3]]


# -- time travel ---------------------------------------------------------------------------


def test_past_versions_alternate_with_the_current_one(client: Client) -> None:
    url = rows_url("orders")
    contents: dict[int, list[list[Any]]] = {}

    def record() -> None:
        version = ok(client.get(f"{BASE}/tables/orders"))["version"]
        contents[version] = q(client, "select id, name from orders order by id")

    ok(client.post(url, json=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]))
    record()
    ok(client.post(url, json=[{"id": 3, "name": "c"}]))
    record()
    ok(client.post(f"{BASE}/tables/orders/delete", json={"keys": {"id": [1]}}))
    record()
    ok(client.post(url, params={"mode": "upsert", "key": "id"}, json=[{"id": 2, "name": "B"}]))
    record()
    # independently of the queries above: what each version must hold
    assert list(contents.values()) == [
        [[1, "a"], [2, "b"]],
        [[1, "a"], [2, "b"], [3, "c"]],
        [[2, "b"], [3, "c"]],
        [[2, "B"], [3, "c"]],
    ]
    current = max(contents)
    for _ in range(3):
        for version, want in sorted(contents.items(), reverse=True):
            at = f"select id, name from orders AT (VERSION => {version}) order by id"
            assert q(client, at) == want, version
            assert q(client, "select id, name from orders order by id") == contents[current]
            plain = "select id, name from orders order by id"
            assert q(client, plain, as_of_version=version) == want, version
    first, last = min(contents), max(contents)
    both = (
        f"select o.id, o.name, p.name from orders o "
        f"join orders p AT (VERSION => {first}) on o.id = p.id order by o.id"
    )
    assert q(client, both) == [[2, "B", "b"]]
    assert q(client, both.replace(f"=> {first}", f"=> {last}")) == [[2, "B", "B"], [3, "c", "c"]]


# -- failed and interrupted queries --------------------------------------------------------

SLOW = "select count(*) from orders, range(100000000) a, range(100000) b"


def test_a_timed_out_query_does_not_return_its_connection(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(client.post(rows_url("orders"), json=[{"id": i, "v": i * i} for i in range(1, 6)]))
    w = watch(client, monkeypatch)
    want = [[5, sum(i * i for i in range(1, 6))]]
    assert q(client, "select count(*), sum(v) from orders") == want  # warms the pool
    r = client.post(f"{BASE}/query", json={"sql": SLOW, "timeout_s": 0.3})
    assert_error(r, 408, "query_timeout")
    interrupted = w.answers[-1]
    assert interrupted.reused  # the slow query ran on the warm connection of orders
    seen = len(w.answers)
    for _ in range(3):
        assert q(client, "select count(*), sum(v) from orders") == want
        assert q(client, "select v from orders where id = 4") == [[16]]
    later = [a for a in w.answers[seen:] if a.reused]
    assert later and all(
        (a.pid, a.connection) != (interrupted.pid, interrupted.connection) for a in later
    )
    assert q(client, "select count(*) from range(1000)") == [[1000]]


def test_failed_queries_do_not_break_later_ones(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(client.post(rows_url("orders"), json=[{"id": 1, "name": "7"}, {"id": 2, "name": "x"}]))
    w = watch(client, monkeypatch)
    assert q(client, "select count(*) from orders") == [[2]]
    for bad in (
        "select nope from orders",  # a binder error
        "select cast(name as integer) from orders",  # fails while running
        "select * from orders o join missing m on o.id = m.id",
    ):
        assert_error(client.post(f"{BASE}/query", json={"sql": bad}), 400, "sql_error")
        assert q(client, "select id, name from orders order by id") == [[1, "7"], [2, "x"]]
    assert q(client, "select cast(name as integer) from orders where id = 1") == [[7]]
    assert w.hits  # the good queries ran on pooled connections


def test_a_truncated_or_planned_query_leaves_a_usable_connection(client: Client) -> None:
    ok(client.post(rows_url("orders"), json=[{"id": i} for i in range(1, 3001)]))
    sql = "select id from orders order by id"
    for _ in range(2):
        r = ok(client.post(f"{BASE}/query", json={"sql": sql, "limit": 2}))
        assert r["rows"] == [[1], [2]]
        page = ok(client.post(f"{BASE}/query", json={"sql": sql, "limit": 3, "offset": 2500}))
        assert page["rows"] == [[2501], [2502], [2503]]
        plan = ok(client.post(f"{BASE}/query/validate", json={"sql": sql}))
        assert [c["name"] for c in plan["columns"]] == ["id"]
        assert q(client, "select count(*), sum(id) from orders") == [[3000, 3000 * 3001 // 2]]


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_queries_on_the_same_views_are_correct(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(client.post(rows_url("orders"), json=[{"id": i, "g": i % 3} for i in range(1, 201)]))
    w = watch(client, monkeypatch)
    expected = {
        "select count(*) from orders": [[200]],
        "select sum(id) from orders": [[200 * 201 // 2]],
        "select g, count(*) from orders group by g order by g": [[0, 66], [1, 67], [2, 67]],
        "select max(id) from orders where g = 0": [[198]],
    }
    sqls = list(expected) * 12

    def one(sql: str) -> tuple[str, list[list[Any]]]:
        return sql, q(client, sql)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, sqls))
    for sql, rows in results:
        assert rows == expected[sql], sql
    assert w.hits  # connections were reused under load
    assert len(w.answers) == len(sqls)


# -- one engine, two supers -----------------------------------------------------------------


def test_same_event_ids_in_two_supers_do_not_share_a_connection(
    client: Client, settings: Settings
) -> None:
    """Redis gives each stream's entries ``<ms>-<seq>`` ids of their own: two supers
    written in the same millisecond get the same event ids, and a table of the same
    name created then has the same incarnation in both. XSETID makes that coincidence
    deterministic here."""
    assert settings.redis_url
    r = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    for sup in ("north", "south"):
        ok(client.post(rows_url("seed", f"/v1/{ORG}/{sup}"), json=[{"x": 1}]))
    future = f"{int(time.time() * 1000) + 600_000}-0"
    for sup in ("north", "south"):
        r.execute_command("XSETID", keys.stream(ORG, sup), future)
    r.close()
    for sup in ("north", "south"):
        ok(client.post(rows_url("t", f"/v1/{ORG}/{sup}"), json=[{"secret": f"{sup} only"}]))
    ids = {
        sup: [
            e["id"]
            for e in ok(client.get("/v1/events", params={"org": ORG, "super": sup, "table": "t"}))[
                "events"
            ]
        ]
        for sup in ("north", "south")
    }
    assert ids["north"] == ids["south"]  # the coincidence this test is about
    assert q(client, "select secret from t", f"/v1/{ORG}/north") == [["north only"]]
    # Regression: the pool key named a view's table by (view name, incarnation,
    # last_event_id), ids of one super's stream; nothing in it named the org or super,
    # so south was served north's pooled connection and read north's rows.
    assert q(client, "select secret from t", f"/v1/{ORG}/south") == [["south only"]]


# -- the engine and its pool, directly -----------------------------------------------------


def test_a_query_under_way_at_close_ends_and_its_worker_with_it(tmp_path: Path) -> None:
    engine = QueryEngine(lambda p: p, QueryLimits(), tmp_path / "q")
    starts = Starts(engine)

    async def main() -> list[Any]:
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def run() -> None:
                sql = "select count(*) as n from range(300000000)"
                result = await engine.run(empty, sql, scope="o/s")
                results.extend(result.table.column("n").to_pylist())

            tg.start_soon(run)
            # The worker has started: close while the query runs on it.
            assert await anyio.to_thread.run_sync(starts.first.wait, 30)
            engine.close()
        return results

    empty = SuperState(org="o", name="s")
    assert anyio.run(main) == [300000000]
    # Regression: a query that ended after close() gave its connection back to the
    # (closed) pool; now its worker is not kept either, and nothing stays behind.
    assert [w.proc.poll() is not None for w in starts.workers] == [True]
    assert engine.workers.total == 0 and engine.workers.idle == []
    with pytest.raises(Unavailable):
        anyio.run(lambda: engine.run(empty, "select 1", scope="o/s"))
    assert not any((tmp_path / "q").glob("worker-*"))


def pooled(tmp_path: Path, name: str) -> Pooled:
    temp = tmp_path / name
    temp.mkdir()
    return Pooled(duckdb.connect(":memory:"), temp)


def test_pool_take_of_an_unknown_key_is_none(tmp_path: Path) -> None:
    pool = ConnectionPool(2)
    assert pool.take(("a",)) is None
    a = pooled(tmp_path, "a")
    assert pool.give(("a",), a)
    assert pool.take(("b",)) is None
    assert pool.take(("a",)) is a
    assert pool.take(("a",)) is None  # taken: not handed out twice
    assert pool.count == 0 and not is_closed(a)
    a.close()


def test_pool_keeps_several_connections_per_key(tmp_path: Path) -> None:
    pool = ConnectionPool(4)
    a1, a2 = pooled(tmp_path, "a1"), pooled(tmp_path, "a2")
    pool.give(("a",), a1)
    pool.give(("a",), a2)
    taken = [pool.take(("a",)), pool.take(("a",))]
    assert {id(t) for t in taken} == {id(a1), id(a2)}
    assert pool.take(("a",)) is None
    pool.close()


def test_pool_evicts_and_closes_the_least_recently_used(tmp_path: Path) -> None:
    pool = ConnectionPool(2)
    a, b, c = (pooled(tmp_path, n) for n in "abc")
    pool.give(("a",), a)
    pool.give(("b",), b)
    # a is used again: b is now the least recently used
    assert pool.take(("a",)) is a
    pool.give(("a",), a)
    pool.give(("c",), c)
    assert pool.count == 2
    assert is_closed(b) and not (tmp_path / "b").exists()
    with pytest.raises(duckdb.ConnectionException):
        b.con.execute("select 1")
    assert pool.take(("b",)) is None
    assert pool.take(("a",)) is a and not is_closed(a)
    assert pool.take(("c",)) is c and not is_closed(c)
    a.close()
    c.close()


def test_pool_evicts_the_oldest_connection_of_the_least_recent_key(tmp_path: Path) -> None:
    pool = ConnectionPool(3)
    a1, a2, b1, c1 = (pooled(tmp_path, n) for n in ("a1", "a2", "b1", "c1"))
    pool.give(("a",), a1)
    pool.give(("a",), a2)
    pool.give(("b",), b1)
    assert pool.take(("a",)) is a2
    pool.give(("a",), a2)  # a is used again while a1 stays idle: b is least recent
    pool.give(("c",), c1)
    assert is_closed(b1) and not any(is_closed(p) for p in (a1, a2, c1))
    assert pool.take(("b",)) is None
    d1 = pooled(tmp_path, "d1")
    pool.give(("d",), d1)  # now a is least recent: its older connection goes first
    assert is_closed(a1) and not is_closed(a2)
    assert pool.count == 3
    pool.close()


def test_pool_does_not_reuse_an_old_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = ConnectionPool(2)
    old, fresh = pooled(tmp_path, "old"), pooled(tmp_path, "fresh")
    old.opened = time.monotonic() - pool_module.POOLED_MAX_AGE_S - 1
    pool.give(("k",), old)
    assert pool.take(("k",)) is None
    assert is_closed(old) and not (tmp_path / "old").exists()
    assert pool.count == 0
    monkeypatch.setattr(pool_module, "POOLED_MAX_AGE_S", 0.0)
    fresh.opened -= 0.001  # any age is too old now
    pool.give(("k",), fresh)
    assert pool.take(("k",)) is None and is_closed(fresh)


def test_pool_of_size_zero_keeps_nothing(tmp_path: Path) -> None:
    pool = ConnectionPool(0)
    a = pooled(tmp_path, "a")
    assert pool.give(("a",), a) is False
    assert pool.count == 0 and pool.take(("a",)) is None
    assert not is_closed(a)  # the caller closes what the pool did not keep
    a.close()


def test_pool_close_closes_every_idle_connection(tmp_path: Path) -> None:
    pool = ConnectionPool(4)
    conns = [pooled(tmp_path, n) for n in ("a1", "a2", "b")]
    pool.give(("a",), conns[0])
    pool.give(("a",), conns[1])
    pool.give(("b",), conns[2])
    pool.close()
    assert all(is_closed(p) for p in conns)
    assert not any((tmp_path / n).exists() for n in ("a1", "a2", "b"))
    assert pool.count == 0 and pool.take(("a",)) is None and pool.take(("b",)) is None


def test_a_truncated_result_does_not_leave_its_connection_in_the_pool(tmp_path: Path) -> None:
    """Regression (review): a result cut at its limit leaves the query unfinished on
    its connection (its state, maybe spill files); such a connection is not kept."""
    engine = QueryEngine(lambda p: p, QueryLimits(), tmp_path / "q")

    async def nothing(analysis: Analysis) -> dict[str, ViewSource]:
        return {}

    async def main(limit: int) -> tuple[int, bool]:
        sql = "select * from range(10) t(i)"
        result = await engine.run(nothing, sql, limit=limit, scope="o/s")
        return result.table.num_rows, result.truncated

    assert anyio.run(main, 3) == (3, True)
    assert kept(engine) == 0
    assert anyio.run(main, 100) == (10, False)
    assert kept(engine) == 1
    engine.close()
