"""Row-level security and column masking: no form of SQL gets around a policy."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed
from tests.support.lake import assert_error, ok

Client = TestClient[Any]
URL = "/v1/acme/sales/tables/people"
ROWS = [
    {"id": 1, "region": "eu", "email": "a@x", "ssn": "111", "amount": 10},
    {"id": 2, "region": "eu", "email": "b@x", "ssn": "222", "amount": 20},
    {"id": 3, "region": "us", "email": "c@x", "ssn": "333", "amount": 30},
]
POLICY = {
    "role": "reader",
    "row_filter": "region = :principal.region",
    "hidden": ["ssn"],
    "masks": {"email": "hash"},
}


@pytest.fixture
def world(settings: Settings) -> Any:
    """Admin data and policy, and a reader of acme whose region is eu."""
    assert settings.redis_url
    with authed(TestClient(create_app(settings, settings.redis_url))) as admin:
        ok(admin.post(f"{URL}/rows", json=ROWS))
        ok(
            admin.post(
                "/v1/acme/sales/tables/other/rows",
                json=[{"id": 1, "note": "n"}, {"id": 3, "note": "m"}],
            )
        )
        pid = admin.post(
            "/v1/principals", json={"name": "eu", "org": "acme", "attributes": {"region": "eu"}}
        ).json()["id"]
        assert (
            admin.post(
                "/v1/grants", json={"principal_id": pid, "role": "reader", "org": "acme"}
            ).status_code
            == 201
        )
        token = admin.post(f"/v1/principals/{pid}/tokens", json={}).json()["token"]
        set_ = ok(admin.put(f"{URL}/policies", json={"policies": [POLICY]}))
        assert set_["version"] == 2 and set_["event_id"]
        with authed(TestClient(create_app(settings, settings.redis_url)), token) as reader:
            yield admin, reader, pid


def q(c: Client, sql: str, **extra: Any) -> list[list[Any]]:
    rows: list[list[Any]] = ok(c.post("/v1/acme/sales/query", json={"sql": sql, **extra}))["rows"]
    return rows


def test_every_form_of_sql_sees_only_the_filtered_rows_and_masked_columns(world: Any) -> None:
    admin, reader, _ = world
    import hashlib

    digest = hashlib.sha256(b"a@x").hexdigest()
    assert q(reader, "select * from people order by id") == [
        [1, "eu", digest, 10],
        [2, "eu", hashlib.sha256(b"b@x").hexdigest(), 20],
    ]
    assert q(admin, "select count(*) from people") == [[3]]  # the admin is not filtered
    for sql, want in (
        ("select count(*), sum(amount) from people", [[2, 30]]),
        ("select max(id) from people", [[2]]),
        ("select count(*) from people p join other o on p.id = o.id", [[1]]),
        ("select count(*) from other where id in (select id from people)", [[1]]),
        ("with x as (select * from people) select count(*) from x", [[1 + 1]]),
        ("select count(*) from (select * from people union all select * from people)", [[4]]),
        ("select count(*) from people where region = 'us'", [[0]]),
        ("select count(*) from people AT (VERSION => 1)", [[2]]),
        ("select count(*) from people p1, people p2", [[4]]),
    ):
        assert q(reader, sql) == want, sql
    assert q(reader, "select count(*) from people", as_of_version=1) == [[2]]
    # The hidden column does not exist for the reader; the masked one holds hashes.
    hidden = reader.post("/v1/acme/sales/query", json={"sql": "select ssn from people"})
    assert hidden.status_code == 400 and "ssn" in hidden.text
    assert q(reader, "select count(*) from people where email = 'a@x'") == [[0]]
    # Column names still show the shape; SELECT * leaves the hidden one out.
    cols = ok(reader.post("/v1/acme/sales/query", json={"sql": "select * from people"}))["columns"]
    assert [c["name"] for c in cols] == ["id", "region", "email", "amount"]


def test_the_principals_attribute_drives_the_filter(world: Any, settings: Settings) -> None:
    admin, reader, pid = world
    ok(admin.patch(f"/v1/principals/{pid}", json={"attributes": {"region": "us"}}))
    assert q(reader, "select id from people") == [[3]]
    ok(admin.patch(f"/v1/principals/{pid}", json={"attributes": {}}))
    assert q(reader, "select id from people") == []  # no attribute: no rows
    ok(admin.patch(f"/v1/principals/{pid}", json={"attributes": {"region": "eu' or '1'='1"}}))
    assert q(reader, "select id from people") == []  # a value, never SQL


def test_policies_are_validated_and_recorded(world: Any) -> None:
    admin, reader, _ = world
    before = ok(admin.get(URL))["version"]
    for bad in (
        {"role": "owner"},
        {"role": "reader", "hidden": ["nope"]},
        {"role": "reader", "masks": {"email": "rot13"}},
        {"role": "reader", "row_filter": "region = (select 1)"},
        {"role": "reader", "row_filter": "read_csv('/etc/passwd') is not null"},
        {"role": "reader", "hidden": ["id", "region", "email", "ssn", "amount"]},
    ):
        r = admin.put(f"{URL}/policies", json={"policies": [bad]})
        assert r.status_code == 400, (bad, r.text)
    twice = admin.put(f"{URL}/policies", json={"policies": [POLICY, POLICY]})
    assert_error(twice, 400, "invalid_policy")
    assert ok(admin.get(URL))["version"] == before
    # Only an org admin sets policies: the reader gets 403.
    assert_error(reader.put(f"{URL}/policies", json={"policies": []}), 403, "forbidden")
    # Unchanged: no event; removed: the reader sees everything again.
    assert ok(admin.put(f"{URL}/policies", json={"policies": [POLICY]}))["event_id"] is None
    ok(admin.put(f"{URL}/policies", json={"policies": []}))
    assert q(reader, "select count(*) from people") == [[3]]
    history = ok(admin.get(f"{URL}/history"))["entries"]
    assert [e["event_type"] for e in history].count("PoliciesSet") == 2


def test_a_policy_bound_reader_gets_no_column_stats(world: Any) -> None:
    admin, reader, _ = world
    assert ok(admin.get(URL))["stats"]["ssn"]["max"] == "333"
    assert ok(reader.get(URL))["stats"] == {}


def test_a_role_that_cannot_read_lifts_no_policy(world: Any) -> None:
    """Regression (security review): a grant of a write-only (or retired) custom role
    on the table used to count as "a role without a policy" and lift the filter."""
    admin, reader, pid = world
    ok(admin.put("/v1/roles/ingest", json={"org": "acme", "permissions": ["write"]}))
    scope = {
        "principal_id": pid,
        "role": "ingest",
        "org": "acme",
        "super": "sales",
        "table": "people",
    }
    assert admin.post("/v1/grants", json=scope).status_code == 201
    assert q(reader, "select id from people order by id") == [[1], [2]]
    assert "ssn" not in [
        c["name"]
        for c in ok(reader.post("/v1/acme/sales/query", json={"sql": "select * from people"}))[
            "columns"
        ]
    ]
    ok(admin.put("/v1/roles/ingest", json={"org": "acme", "permissions": []}))  # retired
    assert q(reader, "select id from people order by id") == [[1], [2]]
    assert ok(reader.get(URL))["stats"] == {}
