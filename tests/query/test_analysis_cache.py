"""The engine keeps the analysis of a statement by its text (issue 19): the analysis
depends on the text alone, while what the statement may read (the caller's tables,
their current versions, policies) is resolved for every query. These tests send the
same text through one app (one engine) as different principals and across catalog
versions, and check that nothing but the parse is reused."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from projections.query import engine as engine_module
from tests.access.test_auth import grant, principal, token_for
from tests.conftest import authed
from tests.support.lake import assert_error, ok

Client = TestClient[Any]
QUERY = "/v1/acme/sales/query"


@pytest.fixture
def app_client(settings: Settings) -> Any:
    assert settings.redis_url
    with authed(TestClient(create_app(settings, settings.redis_url))) as c:
        yield c


def run(client: Client, sql: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(QUERY, json={"sql": sql}, headers=headers)


def analyses(client: Client) -> Any:
    return client.app.state.services.engine._analyses


def test_the_same_text_reads_what_each_caller_may(app_client: Client) -> None:
    c = app_client
    ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1, "region": "eu"}]))
    ok(c.post("/v1/acme/sales/tables/secret/rows", json=[{"id": 7, "region": "us"}]))
    pid = principal(c, "acme", "r")
    grant(c, pid, "reader", "acme", super="sales", table="orders")
    reader = token_for(c, pid)["token"]
    sql = "select * from secret"
    assert ok(run(c, sql))["rows"] == [[7, "us"]]  # the admin's query: kept
    assert sql in analyses(c)
    # The reader's same text: the table it may not read is unknown, as one that does not
    # exist is (with the same error), cache or not.
    hidden, missing = run(c, sql, reader), run(c, "select * from nosuch", reader)
    assert hidden.status_code == missing.status_code == 400, hidden.text
    said, unknown = hidden.json()["error"], missing.json()["error"]
    assert said["code"] == unknown["code"]
    assert said["message"].replace("secret", "nosuch") == unknown["message"]
    assert ok(run(c, "select count(*) from orders", reader))["rows"] == [[1]]


def test_the_same_text_reads_the_current_version_and_policies(app_client: Client) -> None:
    c = app_client
    url = "/v1/acme/sales/tables/people"
    ok(c.post(f"{url}/rows", json=[{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]))
    sql = "select * from people order by id"
    assert ok(run(c, sql))["rows"] == [[1, "eu"], [2, "us"]]
    ok(c.post(f"{url}/rows", json=[{"id": 3, "region": "eu"}]))
    assert ok(run(c, sql))["rows"] == [[1, "eu"], [2, "us"], [3, "eu"]]
    # The table dropped and made again with other columns: the same text sees those.
    ok(c.delete(url))
    ok(c.post(f"{url}/rows", json=[{"id": 9, "name": "x", "score": 1.5}]))
    after = ok(run(c, sql))
    assert [col["name"] for col in after["columns"]] == ["id", "name", "score"]
    assert after["rows"] == [[9, "x", 1.5]]
    # A row policy that binds a reader applies to the text the admin ran unfiltered.
    policy = {"role": "reader", "row_filter": "id > 100"}
    ok(c.put(f"{url}/policies", json={"policies": [policy]}))
    pid = principal(c, "acme", "bound")
    grant(c, pid, "reader", "acme")
    assert ok(run(c, sql, token_for(c, pid)["token"]))["rows"] == []
    assert ok(run(c, sql))["rows"] == [[9, "x", 1.5]]


def test_refused_and_long_statements_are_not_kept(app_client: Client) -> None:
    c = app_client
    ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1}]))
    for _ in range(2):  # refused each time, the same way
        assert_error(run(c, "drop table orders"), 400, "sql_not_select")
        assert_error(run(c, "select 1; select 2"), 400, "sql_multiple_statements")
    assert not any("drop" in k or "select 2" in k for k in analyses(c))
    long = "select 1 " + " " * engine_module.ANALYSES_MAX_CHARS
    assert ok(run(c, long))["rows"] == [[1]]
    assert long not in analyses(c)


def test_the_cache_keeps_the_most_recent_statements(
    app_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = app_client
    ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1}]))
    monkeypatch.setattr(engine_module, "ANALYSES_KEPT", 3)
    for n in range(5):
        assert ok(run(c, f"select {n}"))["rows"] == [[n]]
    assert list(analyses(c)) == ["select 2", "select 3", "select 4"]
    ok(run(c, "select 2"))  # used again: now the most recent
    ok(run(c, "select 5"))
    assert list(analyses(c)) == ["select 4", "select 2", "select 5"]
