"""Metadata under row policies (issue 18): every catalog surface (table detail,
versions, history, events, ``/meta``, the table list) shows a policy-bound reader only
what its policies allow, says what it withholds, and shows everyone else all of it."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed
from tests.support.lake import assert_error, ok

Client = TestClient[Any]
SALES = "/v1/acme/sales"
URL = f"{SALES}/tables/people"
ROWS = [
    {"id": 1, "region": "eu", "email": "a@x", "ssn": "111-11", "amount": 10},
    {"id": 2, "region": "eu", "email": "b@x", "ssn": "222-22", "amount": 20},
    {"id": 3, "region": "us", "email": "c@x", "ssn": "333-33", "amount": 30},
]
MORE = [
    {"id": 4, "region": "eu", "email": None, "ssn": "444-44", "amount": 40},
    {"id": 5, "region": "apac", "email": "e@x", "ssn": "555-55", "amount": 50},
]
EU = [r for r in ROWS + MORE if r["region"] == "eu"]
POLICY = {
    "role": "reader",
    "row_filter": "region = :principal.region",
    "hidden": ["ssn"],
    "masks": {"email": "hash"},
}
# A table whose policy hides and masks but filters no row: its counts are the reader's.
CONTACTS = [{"cid": i, "phone": f"555-{i}", "secret_code": f"k{i}"} for i in range(7)]
CONTACTS_POLICY = {"role": "reader", "hidden": ["secret_code"], "masks": {"phone": "null"}}
HIDDEN = "ssn"


def body(response: Any) -> str:
    return json.dumps(response.json())


def principal(admin: Client, name: str, role: str, **attrs: str) -> str:
    """A principal of acme with ``role`` on the org; its API token."""
    made = admin.post("/v1/principals", json={"name": name, "org": "acme", "attributes": attrs})
    assert made.status_code == 201, made.text
    pid = made.json()
    grant = {"principal_id": pid["id"], "role": role, "org": "acme"}
    assert admin.post("/v1/grants", json=grant).status_code == 201
    issued = admin.post(f"/v1/principals/{pid['id']}/tokens", json={})
    assert issued.status_code == 201, issued.text
    token: str = issued.json()["token"]
    return token


def client_of(settings: Settings) -> Client:
    """A client of its own app (each test client runs its app on its own loop)."""
    assert settings.redis_url
    return TestClient(create_app(settings, settings.redis_url))


@pytest.fixture
def world(settings: Settings) -> Any:
    """people (5 rows, 3 of them eu) under POLICY after an upsert and a delete by key
    and by filter, contacts under CONTACTS_POLICY; an eu reader the policies bind and
    an analyst (a custom read role without a policy)."""
    with authed(client_of(settings)) as admin:
        ok(admin.post(f"{URL}/rows", json=ROWS))
        ok(admin.post(f"{URL}/rows", json=MORE))
        ok(admin.post(f"{URL}/rows?mode=upsert&key=id", json=[{**ROWS[2], "amount": 31}]))
        extra = {"id": 6, "region": "us", "email": "f@x", "ssn": "666-66", "amount": 60}
        ok(admin.post(f"{URL}/rows", json=[extra, {**extra, "id": 7}]))
        ok(admin.post(f"{URL}/delete", json={"keys": {"id": [6]}}))
        ok(admin.post(f"{URL}/delete", json={"where": "ssn = '777-77' or id = 7"}))
        ok(admin.put(f"{URL}/policies", json={"policies": [POLICY]}))
        ok(admin.post(f"{SALES}/tables/contacts/rows", json=CONTACTS))
        ok(admin.put(f"{SALES}/tables/contacts/policies", json={"policies": [CONTACTS_POLICY]}))
        ok(admin.put("/v1/roles/analyst", json={"org": "acme", "permissions": ["read"]}))
        reader = principal(admin, "eu", "reader", region="eu")
        analyst = principal(admin, "analyst", "analyst")
        with authed(client_of(settings), reader) as r, authed(client_of(settings), analyst) as a:
            yield admin, r, a, settings


def test_the_world_is_what_the_tests_assume(world: Any) -> None:
    admin, reader, *_ = world
    count = "select count(*) from people"
    assert ok(admin.post(f"{SALES}/query", json={"sql": count}))["rows"] == [[5]]
    assert ok(reader.post(f"{SALES}/query", json={"sql": count}))["rows"] == [[len(EU)]]
    assert ok(admin.get(URL))["row_count"] == 5


def test_table_detail_withholds_counts_stats_and_the_hidden_column(world: Any) -> None:
    admin, reader, *_ = world
    full = admin.get(URL)
    mine = reader.get(URL)
    assert mine.status_code == 200 and mine.headers["etag"] == full.headers["etag"]
    assert HIDDEN not in body(mine)
    detail = mine.json()
    assert detail["row_count"] is None and detail["row_count"] != full.json()["row_count"]
    for name in ("row_count", "file_count", "size_bytes", "inline_batches", "stats"):
        assert name in detail["withheld"], name
    assert detail["file_count"] is None and detail["size_bytes"] is None
    assert detail["stats"] == {} and "row filter" in detail["withheld_reason"]
    columns = {c["name"]: c for c in detail["columns"]}
    assert list(columns) == ["id", "region", "email", "amount"]
    assert columns["email"]["masked"] is True and columns["email"]["mask"] == "hash"
    assert "masked" not in columns["amount"]
    # The admin sees all of it, as before: counts, stats of every column, no flags.
    everything = full.json()
    assert everything["row_count"] == 5 and everything["file_count"] >= 1
    assert everything["stats"][HIDDEN]["max"] == "555-55"
    assert "withheld" not in everything and "withheld_reason" not in everything
    assert all("masked" not in c for c in everything["columns"])


def test_a_role_without_a_policy_sees_what_the_admin_sees(world: Any) -> None:
    admin, _, analyst, _ = world
    for url in (URL, f"{URL}/versions/3", f"{URL}/history", f"{SALES}/tables", f"{SALES}/meta"):
        assert ok(analyst.get(url)) == ok(admin.get(url)), url
    params = {"org": "acme", "super": "sales", "table": "people"}
    events = ok(analyst.get("/v1/events", params=params))
    assert events == ok(admin.get("/v1/events", params=params))
    assert "withheld" not in json.dumps(events)


def test_masks_without_a_row_filter_keep_the_counts(world: Any) -> None:
    admin, reader, *_ = world
    url = f"{SALES}/tables/contacts"
    mine = ok(reader.get(url))
    assert "secret_code" not in json.dumps(mine)
    assert mine["row_count"] == ok(admin.get(url))["row_count"] == len(CONTACTS)
    counted = ok(reader.post(f"{SALES}/query", json={"sql": "select count(*) from contacts"}))
    assert counted["rows"] == [[mine["row_count"]]]
    # Stored statistics include the masked values: withheld.
    assert mine["stats"] == {} and mine["withheld"] == ["stats"]
    assert [c.get("mask") for c in mine["columns"]] == [None, "null"]
    version = ok(reader.get(f"{url}/versions/{mine['version']}"))
    assert version["row_count"] == len(CONTACTS) and "withheld" not in version
    assert "secret_code" not in json.dumps(version)


def test_every_version_withholds_its_files_and_row_count(world: Any) -> None:
    admin, reader, *_ = world
    current = ok(admin.get(URL))["version"]
    for v in range(current + 1):
        full, mine = admin.get(f"{URL}/versions/{v}"), reader.get(f"{URL}/versions/{v}")
        assert full.status_code == mine.status_code == 200, (v, mine.text)
        assert HIDDEN not in body(mine), v
        version = mine.json()
        assert version["row_count"] is None and version["files"] is None, v
        assert set(version["withheld"]) == {"row_count", "files"}
        if v >= 2:
            assert full.json()["files"] and full.json()["row_count"] >= 3
        assert HIDDEN in [c["name"] for c in full.json()["columns"]] or v == 0


def test_unknown_versions_and_tables_are_404_without_a_leak(world: Any) -> None:
    _, reader, *_ = world
    for url, code in (
        (f"{URL}/versions/999", "version_not_found"),
        (f"{URL}/versions/-1", "version_not_found"),
        (f"{SALES}/tables/nope/versions/1", "table_not_found"),
        (f"{SALES}/tables/nope/history", "table_not_found"),
        (f"{SALES}/tables/nope", "table_not_found"),
    ):
        response = reader.get(url)
        assert_error(response, 404, code)
        assert HIDDEN not in response.text and "row_count" not in response.text
    bad = reader.get(f"{URL}/history", params={"after": "yesterday"})
    assert_error(bad, 400, "invalid_cursor")
    assert HIDDEN not in bad.text
    assert reader.get(f"{URL}/versions/abc").status_code in (400, 404)


def test_history_withholds_row_counts_and_the_hidden_column(world: Any) -> None:
    admin, reader, *_ = world
    full, mine = ok(admin.get(f"{URL}/history")), reader.get(f"{URL}/history")
    assert HIDDEN not in body(mine)
    entries = mine.json()["entries"]
    assert [e["version"] for e in entries] == [e["version"] for e in full["entries"]]
    assert all(e["rows_added"] is None and e["rows_removed"] is None for e in entries)
    assert all(set(e["withheld"]) == {"rows_added", "rows_removed"} for e in entries)
    assert "row filter" in mine.json()["withheld_reason"]
    assert entries[0]["columns_added"] == ["id", "region", "email", "amount"]
    # The admin's are the real counts.
    assert sum(e["rows_added"] for e in full["entries"]) == 5 + 1 + 2  # (the upsert: 1)
    assert HIDDEN in full["entries"][0]["columns_added"] and "withheld_reason" not in full


@pytest.mark.parametrize(
    "params",
    [
        {"org": "acme", "super": "sales", "table": "people"},
        {"org": "acme", "super": "sales"},
        {"org": "acme"},
    ],
)
def test_events_lose_files_keys_filters_counts_and_the_hidden_column(
    world: Any, params: dict[str, str]
) -> None:
    admin, reader, *_ = world
    mine = reader.get("/v1/events", params={**params, "limit": 1000})
    assert mine.status_code == 200 and HIDDEN not in body(mine)
    events = [e for e in mine.json()["events"] if e["table"] == "people"]
    full = [e for e in ok(admin.get("/v1/events", params={**params, "limit": 1000}))["events"]
            if e["table"] == "people"]  # fmt: skip
    assert [e["id"] for e in events] == [e["id"] for e in full] and len(events) >= 8
    leaking = {"files", "removed_files", "deletes", "keys", "where", "policies", "rows",
               "rows_removed", "inserted", "updated", "unchanged"}  # fmt: skip
    assert all(not leaking & set(e) for e in events)
    types = {e["type"] for e in full}
    assert {"RowsAppended", "RowsUpserted", "RowsDeleted", "PoliciesSet"} <= types
    assert any(set(e) & leaking for e in full)  # the admin gets them
    for event, whole in zip(events, full, strict=True):
        assert sorted(set(whole) - set(event) - {"withheld"}) == event.get("withheld", [])
    upsert = next(e for e in events if e["type"] == "RowsUpserted")
    assert upsert["key"] == ["id"]
    assert "row filter" in mine.json()["withheld_reason"]


def test_meta_and_the_table_list_withhold_the_filtered_tables_figures(world: Any) -> None:
    admin, reader, *_ = world
    for url in (f"{SALES}/meta", f"{SALES}/tables"):
        mine, full = reader.get(url), ok(admin.get(url))
        assert HIDDEN not in body(mine)
        tables = {t["name"]: t for t in mine.json()["tables"]}
        everything = {t["name"]: t for t in full["tables"]}
        people = tables["people"]
        assert people["row_count"] is None and people["file_count"] is None
        assert people["size_bytes"] is None
        assert set(people["withheld"]) == {"row_count", "file_count", "size_bytes"}
        assert everything["people"]["row_count"] == 5 and "withheld" not in everything["people"]
        # The contacts table filters no row: its figures are the reader's to know.
        assert tables["contacts"] == everything["contacts"]
        assert "row filter" in mine.json()["withheld_reason"]
    meta = ok(reader.get(f"{SALES}/meta"))
    assert meta["row_count"] is None and meta["size_bytes"] is None
    assert set(meta["withheld"]) == {"row_count", "file_count", "size_bytes"}
    full_meta = ok(admin.get(f"{SALES}/meta"))
    assert full_meta["row_count"] == 5 + len(CONTACTS) and "withheld" not in full_meta


def test_a_column_one_role_hides_and_another_masks_is_masked(world: Any) -> None:
    """Several roles: each column as the most open of them shows it (it was shown in
    clear when one role hid it and another masked it)."""
    admin, *_, settings = world
    ok(admin.put("/v1/roles/auditor", json={"org": "acme", "permissions": ["read"]}))
    both = principal(admin, "both", "reader", region="eu")
    pid = next(p["id"] for p in ok(admin.get("/v1/principals")) if p["name"] == "both")
    grant = {"principal_id": pid, "role": "auditor", "org": "acme"}
    assert admin.post("/v1/grants", json=grant).status_code == 201
    auditor = {"role": "auditor", "masks": {"ssn": "hash", "email": "null"}}
    ok(admin.put(f"{URL}/policies", json={"policies": [POLICY, auditor]}))
    with authed(client_of(settings), both) as c:
        rows = ok(c.post(f"{SALES}/query", json={"sql": "select ssn from people order by id"}))
        assert len(rows["rows"]) == 5  # the auditor's policy filters no row
        assert all(len(r[0]) == 64 and "-" not in r[0] for r in rows["rows"])  # hashes
        columns = {col["name"]: col for col in ok(c.get(URL))["columns"]}
        assert columns["ssn"]["mask"] == "hash" and columns["email"]["mask"] == "hash"
        detail = ok(c.get(URL))
        assert detail["row_count"] == 5 and detail["stats"] == {}


def test_events_of_a_dropped_table_are_withheld_from_all_but_admins(world: Any) -> None:
    """Its policies went with it: for a caller a policy could bind, its events lose
    every figure, file and column name; admins still see them whole."""
    admin, reader, analyst, _ = world
    gone = f"{SALES}/tables/gone"
    ok(admin.post(f"{gone}/rows", json=[{"k": 1, "region": "us", "ssn": "999-99"}]))
    ok(admin.put(f"{gone}/policies", json={"policies": [POLICY | {"masks": {}}]}))
    ok(admin.delete(gone))
    params = {"org": "acme", "super": "sales", "table": "gone"}
    for caller in (reader, analyst):
        page = caller.get("/v1/events", params=params)
        assert page.status_code == 200 and HIDDEN not in body(page)
        assert "999-99" not in page.text and "no longer exists" in page.json()["withheld_reason"]
        events = page.json()["events"]
        assert [e["type"] for e in events][-1] == "TableDropped"
        assert all("rows" not in e and "columns" not in e and "files" not in e for e in events)
    whole = ok(admin.get("/v1/events", params=params))["events"]
    assert HIDDEN in json.dumps(whole) and whole[-1]["rows"] == 1


def test_a_caller_that_may_not_read_sees_no_more_than_a_bound_reader(world: Any) -> None:
    """A write-only role lifts no policy: of a table with policies it sees the schema
    (to write by) but none of the figures over its rows; of one without, all of it."""
    admin, _reader, _analyst, settings = world
    ok(admin.put("/v1/roles/loader", json={"org": "acme", "permissions": ["write"]}))
    ok(admin.post(f"{SALES}/tables/plain/rows", json=[{"x": 1}, {"x": 2}]))
    token = principal(admin, "loader", "loader")
    with authed(client_of(settings), token) as loader:
        for url in (f"{SALES}/meta", f"{SALES}/tables"):
            listed = {t["name"]: t for t in ok(loader.get(url))["tables"]}
            for name in ("people", "contacts"):
                assert listed[name]["row_count"] is None and listed[name]["size_bytes"] is None
                assert listed[name]["file_count"] is None, name
            assert listed["plain"]["row_count"] == 2  # no policies: nothing to withhold
        meta = ok(loader.get(f"{SALES}/meta"))
        assert meta["row_count"] is None and "may not read" in meta["withheld_reason"]
        assert_error(loader.get(URL), 403, "forbidden")  # the detail needs read, as before
        # It writes by the schema it sees, and its write changes no figure it is shown.
        assert ok(loader.post(f"{URL}/rows", json=[{**MORE[0], "id": 9}]))["rows"] == 1
        after = {t["name"]: t for t in ok(loader.get(f"{SALES}/tables"))["tables"]}
        assert after["people"]["row_count"] is None
    assert ok(admin.get(URL))["row_count"] == 6


def test_a_bound_reader_is_not_pointed_at_the_mirrors(settings: Settings) -> None:
    """A mirror holds every row and column: a reader its policies bind sees the mirror's
    status, not where it is nor its publish errors (which may name any column)."""
    with_mirrors = msgspec.structs.replace(settings, mirrors="delta,iceberg")
    with authed(client_of(with_mirrors)) as admin:
        ok(admin.post(f"{URL}/rows", json=ROWS))
        ok(admin.put(f"{URL}/policies", json={"policies": [POLICY]}))
        token = principal(admin, "eu", "reader", region="eu")
        deadline = time.monotonic() + 60
        full = ok(admin.get(URL))["mirrors"]
        while not all(m["location"] for m in full):  # the runners publish in the background
            assert time.monotonic() < deadline, f"the mirrors were not published: {full}"
            full = ok(admin.get(URL))["mirrors"]
        assert {m["format"] for m in full} == {"delta", "iceberg"}
        with authed(client_of(with_mirrors), token) as reader:
            mine = ok(reader.get(URL))
    assert {m["format"] for m in mine["mirrors"]} == {"delta", "iceberg"}
    assert all(m["location"] is None and m["metadata_location"] is None for m in mine["mirrors"])
    assert all(m["error"] is None for m in mine["mirrors"]) and "mirrors" in mine["withheld"]
    assert full[0]["location"] not in json.dumps(mine)
