"""Past table versions through the HTTP API: version details, restore, time-travel
queries (as_of_version, as_of_time, ``t AT (...)``), expiry and gc of expired files."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.gc import collect_garbage
from app.services import Services
from app.settings import Settings
from app.write.changes.commit import Outcome, Target
from tests.conftest import authed
from tests.support.lake import (
    ORG,
    SUP,
    TBL,
    Client,
    append,
    assert_error,
    delete_call,
    detail,
    event_ids,
    events,
    history,
    ok,
    query,
    query_call,
    stored_files,
    table_url,
    upsert,
)

ALL = "select * from orders order by all"


def restore_call(client: Client, version: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(table_url(suffix="/restore"), json={"version": version}, headers=headers)


def version_detail(client: Client, version: int) -> dict[str, Any]:
    body: dict[str, Any] = ok(client.get(table_url(suffix=f"/versions/{version}")))
    return body


def entries(client: Client) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = ok(client.get(table_url(suffix="/history")))["entries"]
    return out


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def build_history(client: Client) -> None:
    """orders, version by version:
    0 created (id, name) · 1 +{1 a, 2 b} · 2 +{3 c} · 3 note added · 4 +{4 d x}
    · 5 id 1 deleted · 6 id 2 upserted to B"""
    append(client, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    append(client, [{"id": 3, "name": "c"}])
    assert append(client, [{"id": 4, "name": "d", "note": "x"}])["version"] == 4
    assert ok(delete_call(client, {"keys": {"id": [1]}}))["version"] == 5
    assert upsert(client, [{"id": 2, "name": "B"}])["version"] == 6


CONTENTS = {
    0: [],
    1: [[1, "a"], [2, "b"]],
    2: [[1, "a"], [2, "b"], [3, "c"]],
    3: [[1, "a", None], [2, "b", None], [3, "c", None]],
    4: [[1, "a", None], [2, "b", None], [3, "c", None], [4, "d", "x"]],
    5: [[2, "b", None], [3, "c", None], [4, "d", "x"]],
    6: [[2, "B", None], [3, "c", None], [4, "d", "x"]],
}


# -- GET versions/{n} -------------------------------------------------------------------


def test_version_detail_describes_each_past_version(client: Client) -> None:
    build_history(client)
    hist = {e["version"]: e for e in entries(client)}
    first_file = events(client)[1]["files"][0]
    for v, rows in CONTENTS.items():
        body = version_detail(client, v)
        assert body["table"] == TBL
        assert body["version"] == v
        names = [c["name"] for c in body["columns"]]
        assert names == (["id", "name"] if v < 3 else ["id", "name", "note"])
        assert body["row_count"] == len(rows)
        assert sum(f["rows"] - f["deleted_rows"] for f in body["files"]) == len(rows)
        assert body["event_id"] == hist[v]["event_id"]
        assert parse(body["committed_at"]) == parse(hist[v]["time"])
        assert body["committed_by"] == "api-token"
    v1 = version_detail(client, 1)
    assert v1["files"] == [
        {
            "path": first_file["path"],
            "rows": 2,
            "size_bytes": first_file["size_bytes"],
            "inline": False,
            "deleted_rows": 0,
        }
    ]
    assert version_detail(client, 0)["files"] == []
    assert [c["type"] for c in version_detail(client, 3)["columns"]] == [
        "int64",
        "string",
        "string",
    ]
    # the current version has the current detail's files
    now = version_detail(client, 6)
    assert now["row_count"] == detail(client)["row_count"] == 3
    assert len(now["files"]) == detail(client)["file_count"]


@pytest.mark.parametrize("version", [7, 100, -1])
def test_version_detail_of_a_version_that_never_existed_is_404(
    client: Client, version: int
) -> None:
    build_history(client)
    r = client.get(table_url(suffix=f"/versions/{version}"))
    assert_error(r, 404, "version_not_found")


def test_version_detail_of_a_missing_table_is_404(client: Client) -> None:
    append(client, [{"id": 1}])
    assert_error(client.get(table_url("nope", "/versions/0")), 404, "table_not_found")


# -- time-travel queries ----------------------------------------------------------------


def test_as_of_version_queries_each_past_version(client: Client) -> None:
    build_history(client)
    for v, rows in CONTENTS.items():
        assert query(client, ALL, as_of_version=v) == rows, v
    assert query(client, "select count(*) from orders", as_of_version=2) == [[3]]
    # columns of a later schema do not exist in an earlier version
    r = query_call(client, "select note from orders", as_of_version=2)
    assert_error(r, 400, "sql_error")


def test_at_version_in_sql_mixes_with_the_current_table(client: Client) -> None:
    build_history(client)
    rows = query(
        client,
        "select cur.id, old.name, cur.name from orders cur "
        "join orders old AT (VERSION => 1) on old.id = cur.id order by cur.id",
    )
    assert rows == [[2, "b", "B"]]
    rows = query(
        client,
        "select id from orders AT (VERSION => 2) except select id from orders order by id",
    )
    assert rows == [[1]]
    # two past versions in one query, with and without an alias
    rows = query(
        client,
        "select (select count(*) from orders AT (VERSION => 1)), "
        "(select count(*) from orders as v4 AT (VERSION => 4)), (select count(*) from orders)",
    )
    assert rows == [[2, 4, 3]]
    # names are case-insensitive, and one table read twice is still one table
    assert query(client, "select count(*) from ORDERS AT (VERSION => 2)") == [[3]]
    sql = "select a.id, b.name from orders a join orders b using (id) order by a.id"
    assert query(client, sql, as_of_version=1) == [[1, "a"], [2, "b"]]


def test_at_timestamp_and_as_of_time(client: Client) -> None:
    build_history(client)
    times = [(e["version"], parse(e["time"])) for e in entries(client)]
    for v, at in times:
        # the last version committed at or before that instant (several versions may
        # share a millisecond)
        expected = max(u for u, t in times if t <= at)
        assert query(client, ALL, as_of_time=at.isoformat()) == CONTENTS[expected]
        sql = f"select * from orders AT (TIMESTAMP => '{at.isoformat()}') order by all"
        assert query(client, sql) == CONTENTS[expected], v
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert query(client, ALL, as_of_time=future) == CONTENTS[6]
    # no offset: UTC
    naive = times[-1][1].astimezone(UTC).replace(tzinfo=None).isoformat()
    assert query(client, ALL, as_of_time=naive) == CONTENTS[6]


def test_as_of_time_before_the_table_existed_is_404(client: Client) -> None:
    build_history(client)
    r = query_call(client, ALL, as_of_time="2000-01-01T00:00:00Z")
    assert_error(r, 404, "version_not_found")


def test_as_of_time_applies_to_every_table(client: Client) -> None:
    append(client, [{"id": 1}])
    append(client, [{"id": 10}], table="other")
    append(client, [{"id": 2}])
    append(client, [{"id": 20}], table="other")

    def times(table: str) -> list[tuple[int, datetime]]:
        found = ok(client.get(table_url(table, "/history")))["entries"]
        return [(e["version"], parse(e["time"])) for e in found]

    sums = {"orders": {1: 1, 2: 3}, "other": {1: 10, 2: 30}}
    sql = "select (select sum(id) from orders), (select sum(id) from other)"
    assert query(client, sql) == [[3, 30]]
    cutoff = times("other")[1][1]  # when other got its first rows
    expected = [sums[t][max(v for v, at in times(t) if at <= cutoff)] for t in ("orders", "other")]
    assert query(client, sql, as_of_time=cutoff.isoformat()) == [expected]
    # and a version pinned in the SQL wins over as_of_time for that reference
    pinned = "select (select sum(id) from orders AT (VERSION => 2)), (select sum(id) from other)"
    assert query(client, pinned, as_of_time=cutoff.isoformat()) == [[3, expected[1]]]


@pytest.mark.parametrize(
    ("sql", "extra", "status", "code"),
    [
        (ALL, {"as_of_version": 1, "as_of_time": "2030-01-01T00:00:00Z"}, 400,
         "invalid_time_travel"),
        (ALL, {"as_of_version": 99}, 404, "version_not_found"),
        (ALL, {"as_of_version": -1}, 404, "version_not_found"),
        (ALL, {"as_of_time": "yesterday"}, 400, "invalid_time_travel"),
        (ALL, {"as_of_time": ""}, 400, "invalid_time_travel"),
        ("select * from orders AT (VERSION => 1 + 1)", {}, 400, "invalid_time_travel"),
        ("select * from orders AT (VERSION => '1')", {}, 400, "invalid_time_travel"),
        ("select * from orders AT (VERSION => id)", {}, 400, "invalid_time_travel"),
        ("select * from orders AT (VERSION => 99)", {}, 404, "version_not_found"),
        ("select * from orders AT (TIMESTAMP => 'garbage')", {}, 400, "invalid_time_travel"),
        ("select * from orders AT (TIMESTAMP => 5)", {}, 400, "invalid_time_travel"),
        ("select * from orders join other using (id)", {"as_of_version": 1}, 400,
         "invalid_time_travel"),
        ("select 1", {"as_of_version": 1}, 400, "invalid_time_travel"),
        ("select * from orders", {"as_of_version": 1, "extra": 1}, 400, "invalid_request"),
    ],
    ids=["both", "future_version", "negative_version", "bad_time", "empty_time",
         "expression_version", "string_version", "column_version", "sql_future_version",
         "sql_bad_time", "sql_number_time", "two_tables", "no_table", "unknown_field"],
)  # fmt: skip
def test_bad_time_travel_is_rejected(
    client: Client, sql: str, extra: dict[str, Any], status: int, code: str
) -> None:
    build_history(client)
    append(client, [{"id": 1}], table="other")
    assert_error(query_call(client, sql, **extra), status, code)


def test_as_of_version_counts_tables_not_cte_names(client: Client) -> None:
    build_history(client)
    sql = "with recent as (select * from orders where id > 1) select * from recent order by all"
    # A CTE's name is not a table: the query names exactly one.
    assert query(client, sql, as_of_version=2) == [[2, "b"], [3, "c"]]


# -- restore ----------------------------------------------------------------------------


def test_restore_brings_back_the_schema_and_rows_of_a_version(client: Client) -> None:
    build_history(client)
    r = restore_call(client, 1)
    body = ok(r)
    assert body == {
        "table": TBL,
        "version": 7,
        "restored_version": 1,
        "event_id": body["event_id"],
        "replayed": False,
    }
    assert body["event_id"]
    assert r.headers["etag"] == '"7"'
    assert query(client, ALL) == CONTENTS[1]
    assert [c["name"] for c in detail(client)["columns"]] == ["id", "name"]
    assert history(client)[-1] == (7, "TableRestored", 2, 3)
    assert sorted(f["path"] for f in version_detail(client, 7)["files"]) == sorted(
        f["path"] for f in version_detail(client, 1)["files"]
    )
    # the versions in between are still there, and the table goes on from here
    assert query(client, ALL, as_of_version=6) == CONTENTS[6]
    append(client, [{"id": 5, "name": "e", "note": "y"}])
    assert query(client, "select id, note from orders order by id") == [
        [1, None],
        [2, None],
        [5, "y"],
    ]
    # and restoring the latest state of before the restore works too
    ok(restore_call(client, 6))
    assert query(client, ALL) == CONTENTS[6]


def test_restore_version_zero_empties_the_table(client: Client) -> None:
    build_history(client)
    body = ok(restore_call(client, 0))
    assert body["version"] == 7
    assert query(client, ALL) == []
    assert detail(client)["row_count"] == 0
    assert history(client)[-1] == (7, "TableRestored", 0, 3)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"version": 7}, 404, "version_not_found"),
        ({"version": -1}, 404, "version_not_found"),
        ({}, 400, "invalid_request"),
        ({"version": 1, "extra": True}, 400, "invalid_request"),
    ],
    ids=["future", "negative", "missing", "unknown_field"],
)
def test_bad_restores_are_rejected(
    client: Client, body: dict[str, Any], status: int, code: str
) -> None:
    build_history(client)
    before = event_ids(client)
    r = client.post(table_url(suffix="/restore"), json=body)
    assert_error(r, status, code)
    assert event_ids(client) == before


def test_restore_of_a_missing_table_is_404(client: Client) -> None:
    append(client, [{"id": 1}])
    r = client.post(table_url("nope", "/restore"), json={"version": 0})
    assert_error(r, 404, "table_not_found")


def test_restore_if_match_and_idempotency(client: Client) -> None:
    build_history(client)
    stale = restore_call(client, 1, headers={"If-Match": '"5"'})
    assert assert_error(stale, 409, "version_conflict")["details"]["current_version"] == 6
    assert query(client, ALL) == CONTENTS[6]
    headers = {"Idempotency-Key": "restore-1", "If-Match": '"6"'}
    first = ok(restore_call(client, 1, headers=headers))
    after = event_ids(client)
    again = ok(restore_call(client, 1, headers=headers))
    assert again == {**first, "replayed": True}
    assert event_ids(client) == after
    other = restore_call(client, 2, headers={"Idempotency-Key": "restore-1"})
    assert_error(other, 422, "idempotency_key_reused")
    assert event_ids(client) == after


# -- expiry and gc ----------------------------------------------------------------------


def run(settings: Settings, fn: Any) -> Any:
    """Run ``fn(services)`` on a Services of its own (as the CLI does)."""

    async def main() -> Any:
        async with Services.open(settings) as services:
            return await fn(services)

    return anyio.run(main)


def expire(settings: Settings, older_than: datetime) -> Outcome:
    target = Target(ORG, SUP, TBL, actor="test")
    outcome: Outcome = run(settings, lambda s: s.mutator.expire(target, older_than))
    return outcome


def gc(settings: Settings) -> set[str]:
    """Collect garbage as if two hours had passed; the keys deleted."""
    later = datetime.now(UTC) + timedelta(hours=2)
    grace = timedelta(seconds=settings.gc_grace_s)

    async def collect(services: Services) -> set[str]:
        report = await collect_garbage(
            services.log, services.reader, services.storage, grace=grace, dry_run=False, now=later
        )
        assert report.deleted == len(report.orphans)
        return {o.key for o in report.orphans}

    result: set[str] = run(settings, collect)
    return result


def data_paths(files: list[dict[str, Any]]) -> set[str]:
    return {f["path"] for f in files if not f["inline"]}


def test_expired_versions_are_gone_and_gc_deletes_only_their_files(
    client: Client, settings: Settings
) -> None:
    build_history(client)
    all_files = stored_files(settings.storage_root)
    kept = data_paths(version_detail(client, 6)["files"])
    assert kept < all_files
    # nothing is garbage while every version is retained
    assert gc(settings) == set()
    assert stored_files(settings.storage_root) == all_files

    outcome = expire(settings, datetime.now(UTC) + timedelta(seconds=1))
    assert outcome.event_id is not None
    assert outcome.version == 7
    assert outcome.result == {"retained_from": 6}
    assert detail(client)["retained_from"] == 6
    assert history(client)[-1][:2] == (7, "VersionsExpired")

    for v in range(6):
        error = assert_error(query_call(client, ALL, as_of_version=v), 410, "version_expired")
        assert error["details"]["retained_from"] == 6
        sql = f"select * from orders AT (VERSION => {v})"
        assert_error(query_call(client, sql), 410, "version_expired")
        assert_error(client.get(table_url(suffix=f"/versions/{v}")), 410, "version_expired")
        before = event_ids(client)
        assert_error(restore_call(client, v), 410, "version_expired")
        assert event_ids(client) == before
    first_time = entries(client)[1]["time"]
    r = query_call(client, ALL, as_of_time=first_time)
    assert_error(r, 410, "version_expired")
    # the retained versions still work
    assert query(client, ALL, as_of_version=6) == CONTENTS[6]
    assert query(client, ALL, as_of_version=7) == CONTENTS[6]
    assert version_detail(client, 6)["row_count"] == 3

    deleted = gc(settings)
    assert deleted == all_files - kept
    assert stored_files(settings.storage_root) == kept
    assert query(client, ALL) == CONTENTS[6]


def test_expiry_keeps_the_version_current_at_the_cutoff(client: Client, settings: Settings) -> None:
    build_history(client)
    times = [(e["version"], parse(e["time"])) for e in entries(client)]
    cutoff = times[2][1]  # when version 2 was committed
    keep = max(v for v, t in times if t <= cutoff)
    outcome = expire(settings, cutoff)
    assert outcome.result == {"retained_from": keep}
    assert_error(query_call(client, ALL, as_of_version=keep - 1), 410, "version_expired")
    assert query(client, ALL, as_of_version=keep) == CONTENTS[keep]
    # files of the version kept (and of every later one) survive gc
    retained = set()
    for v in range(keep, 7):
        retained |= data_paths(version_detail(client, v)["files"])
    gc(settings)
    assert stored_files(settings.storage_root) == retained
    for v in range(keep, 7):
        assert query(client, ALL, as_of_version=v) == CONTENTS[v]


def test_expiry_before_any_version_does_nothing(client: Client, settings: Settings) -> None:
    build_history(client)
    before = event_ids(client)
    outcome = expire(settings, datetime(2000, 1, 1, tzinfo=UTC))
    assert outcome.event_id is None
    assert event_ids(client) == before
    assert query(client, ALL, as_of_version=0) == []


def test_cli_expire(client: Client, settings: Settings) -> None:
    build_history(client)
    assert settings.redis_url
    env = {
        **os.environ,
        "LEDGERLAKE_REDIS_URL": settings.redis_url,
        "LEDGERLAKE_REDIS_PREFIX": settings.redis_prefix,
        "LEDGERLAKE_DATA_DIR": str(settings.data_dir),
    }
    cli = Path(sys.executable).parent / "ledgerlake"
    done = subprocess.run(
        [str(cli), "expire", "--older-than", "0s", f"{ORG}/{SUP}/{TBL}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"{ORG}/{SUP}/{TBL}: versions before 6 expired (now at version 7)" in done.stdout
    assert detail(client)["retained_from"] == 6
    assert_error(query_call(client, ALL, as_of_version=5), 410, "version_expired")
    assert query(client, ALL, as_of_version=6) == CONTENTS[6]


def listed(settings: Settings) -> set[str]:
    async def keys(services: Services) -> set[str]:
        return {o.key async for o in services.storage.list_objects()}

    found: set[str] = run(settings, keys)
    return found


def test_the_whole_lifecycle_on_each_storage_backend(any_settings: Settings) -> None:
    """Upsert, delete, compaction, time travel, restore, expiry and gc read and write
    the data files through the configured storage (local disk, then S3)."""
    assert any_settings.redis_url
    with authed(TestClient(create_app(any_settings, any_settings.redis_url))) as client:
        build_history(client)
        for v, rows in CONTENTS.items():
            assert query(client, ALL, as_of_version=v) == rows
        append(client, [{"id": 7, "name": "g"}])  # 7
        body = ok(client.post(table_url(suffix="/compact")))  # 8
        assert (body["files_removed"], body["files_added"], body["rows"]) == (4, 1, 4)
        assert query(client, ALL) == [*CONTENTS[6], [7, "g", None]]
        assert ok(restore_call(client, 6))["version"] == 9
        assert query(client, ALL) == CONTENTS[6]
        everything = listed(any_settings)
        kept = data_paths(version_detail(client, 9)["files"])
        outcome = expire(any_settings, datetime.now(UTC) + timedelta(seconds=1))
        assert outcome.result == {"retained_from": 9}
        assert_error(query_call(client, ALL, as_of_version=8), 410, "version_expired")
        assert gc(any_settings) == everything - kept
        assert listed(any_settings) == kept
        assert query(client, ALL) == CONTENTS[6]
        assert upsert(client, [{"id": 3, "name": "C"}])["updated"] == 1
        assert query(client, "select name from orders order by id") == [["B"], ["C"], ["d"]]
