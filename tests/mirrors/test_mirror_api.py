"""The API of the mirrors issue: dropping a table (and re-creating its name), choosing a
table's mirror formats, the ``LEDGERLAKE_MIRRORS`` default, the mirror status in the
table detail, and the mirror lags in ``/health`` and ``/metrics``.

Everything goes through the real HTTP API, a real redis-server and real storage (local
disk; the ``lake`` fixture also runs on S3). Projections run only when a test calls
``lake.sync()``, so what the mirrors hold is deterministic."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import polars as pl
import pytest
from deltalake import DeltaTable

from app.ops.gc import collect_garbage
from app.services import Services
from app.settings import Settings
from tests.support.lake import (
    ORG,
    SUP,
    TBL,
    append,
    assert_error,
    detail,
    event_ids,
    events,
    history,
    ok,
    query,
    query_call,
    stored_files,
    table_url,
)
from tests.support.mirror_lake import Lake, open_lake

FORMATS = ("delta", "iceberg")


# -- helpers ---------------------------------------------------------------------------


def mirrors_of(lake: Lake, table: str = TBL) -> dict[str, dict[str, Any]]:
    """The ``mirrors`` of the table detail, by format."""
    found = {m["format"]: m for m in detail(lake.client, table)["mirrors"]}
    assert sorted(found) == list(FORMATS)
    return found


def put_mirrors(
    lake: Lake, formats: Any, table: str = TBL, headers: dict[str, str] | None = None
) -> Any:
    return lake.client.put(table_url(table, "/mirrors"), json={"formats": formats}, headers=headers)


def drop(lake: Lake, table: str = TBL, headers: dict[str, str] | None = None) -> Any:
    return lake.client.delete(table_url(table), headers=headers)


def root(settings: Settings) -> Path:
    return settings.data_dir / "files"


def table_dir(settings: Settings, table: str = TBL) -> Path:
    return root(settings) / ORG / SUP / table


def delta_rows(location: str) -> list[dict[str, Any]]:
    """The Delta mirror's rows, read by polars (an independent reader)."""
    rows: list[dict[str, Any]] = pl.read_delta(location).sort("id").to_dicts()
    return rows


def iceberg_rows(metadata_location: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pl.scan_iceberg(metadata_location).collect().sort("id").to_dicts()
    return rows


def all_events(lake: Lake, table: str = TBL) -> list[tuple[str, int]]:
    return [(e["type"], e["version"]) for e in events(lake.client, table)]


def gc(settings: Settings) -> Any:
    """``ledgerlake gc`` with every file old enough: the writers' grace period (one
    hour, recorded by them in Redis) has passed for all of them."""

    async def run() -> Any:
        async with Services.open(settings) as services:
            return await collect_garbage(
                services.log,
                services.reader,
                services.storage,
                grace=timedelta(seconds=settings.gc_grace_s),
                dry_run=False,
                now=datetime.now(UTC) + timedelta(seconds=2 * settings.gc_grace_s),
            )

    return anyio.run(run)


def lake_with(settings: Settings) -> contextlib.AbstractContextManager[Lake]:
    return contextlib.contextmanager(open_lake)(settings)


# -- dropping a table ------------------------------------------------------------------


def test_drop_answers_and_frees_the_name(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1, "a": "x"}, {"id": 2, "a": "y"}])
    append(c, [{"id": 3, "a": "z"}])
    append(c, [{"id": 9}], table="other")
    before = len(event_ids(c))

    body = ok(drop(local_lake))
    assert body["table"] == TBL
    assert body["version"] == 3  # TableCreated 0, two appends, the drop
    assert body["rows"] == 3
    assert body["event_id"] and body["replayed"] is False
    assert event_ids(c)[-1] == body["event_id"] and len(event_ids(c)) == before + 1

    assert_error(c.get(table_url()), 404, "table_not_found")
    assert_error(c.get(table_url(suffix="/versions/1")), 404, "table_not_found")
    listed = ok(c.get(f"/v1/{ORG}/{SUP}/tables"))["tables"]
    assert [t["name"] for t in listed] == ["other"]
    assert query_call(c, f"select count(*) from {TBL}").status_code in (400, 404)
    assert query(c, "select id from other") == [[9]]  # the other table is untouched
    # The events stay: the audit log still has the dropped table's whole life.
    assert all_events(local_lake) == [
        ("TableCreated", 0),
        ("RowsAppended", 1),
        ("RowsAppended", 2),
        ("TableDropped", 3),
    ]

    # Dropping it again, or a table that never existed: 404, and no event.
    assert_error(drop(local_lake), 404, "table_not_found")
    assert_error(drop(local_lake, "never"), 404, "table_not_found")
    assert_error(c.delete(f"/v1/{ORG}/nosuper/tables/x"), 404, "super_not_found")
    assert_error(c.delete("/v1/noorg/s/tables/x"), 404, "org_not_found")
    assert len(event_ids(c)) == before + 1


def test_a_dropped_name_starts_a_new_table(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1, "a": "x"}, {"id": 2, "a": "y"}])
    append(c, [{"id": 3, "a": "z"}])
    dropped = ok(drop(local_lake))["version"]
    assert dropped == 3

    # An old ETag can never match the new table: the name's versions go on.
    stale = c.post(table_url(suffix="/rows"), json=[{"id": 9}], headers={"If-Match": "1"})
    assert_error(stale, 409, "version_conflict")

    # Another schema: nothing of the old table's columns remains. If-Match -1 ("must
    # not exist yet") holds again.
    rows = [{"id": 10.5, "b": True}]
    created = ok(c.post(table_url(suffix="/rows"), json=rows, headers={"If-Match": "-1"}))
    assert created["version"] == dropped + 2  # TableCreated, then RowsAppended
    table = detail(c)
    assert table["version"] == 5 and table["row_count"] == 1 and table["file_count"] == 1
    assert [(col["name"], col["type"]) for col in table["columns"]] == [
        ("id", "float64"),
        ("b", "bool"),
    ]
    assert query(c, f"select id, b from {TBL}") == [[10.5, True]]
    assert query_call(c, f"select a from {TBL}").status_code == 400

    # The history and the audit log keep both tables' events, in order.
    assert [(v, kind) for v, kind, _, _ in history(c)] == [
        (0, "TableCreated"),
        (1, "RowsAppended"),
        (2, "RowsAppended"),
        (3, "TableDropped"),
        (4, "TableCreated"),
        (5, "RowsAppended"),
    ]
    assert [kind for kind, _ in all_events(local_lake)].count("TableCreated") == 2


def test_time_travel_sees_only_the_new_incarnation(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": i, "a": "old"} for i in range(5)])  # version 1: 5 rows
    append(c, [{"id": 5, "a": "old"}])  # version 2
    append(c, [{"id": 6, "a": "old"}])  # version 3
    old_v1 = ok(c.get(table_url(suffix="/versions/1")))  # cached by this process now
    assert old_v1["row_count"] == 5
    old_time = events(c)[1]["time"]  # when the old table's version 1 was committed
    assert query(c, f"select count(*) from {TBL}", as_of_version=1) == [[5]]
    assert ok(drop(local_lake))["version"] == 4
    append(c, [{"id": 100, "n": 1}])  # the new table: created at 5, its rows at 6
    append(c, [{"id": 101, "n": 2}])  # version 7

    v6 = ok(c.get(table_url(suffix="/versions/6")))
    assert v6["row_count"] == 1
    assert [col["name"] for col in v6["columns"]] == ["id", "n"]
    assert v6["files"] != old_v1["files"]
    v5 = ok(c.get(table_url(suffix="/versions/5")))
    assert v5["row_count"] == 0 and [col["name"] for col in v5["columns"]] == ["id", "n"]
    # Versions 0 to 4 only existed in (or dropped) the old table.
    for version in (0, 1, 3, 4):
        assert_error(c.get(table_url(suffix=f"/versions/{version}")), 404, "version_not_found")
        assert_error(
            query_call(c, f"select count(*) from {TBL}", as_of_version=version),
            404,
            "version_not_found",
        )

    assert query(c, f"select id from {TBL}", as_of_version=6) == [[100]]
    assert query(c, f"select count(*) from {TBL}", as_of_version=5) == [[0]]
    assert query(c, f"select id from {TBL} AT (VERSION => 6)") == [[100]]
    assert query(c, f"select id from {TBL} order by id") == [[100], [101]]
    # An instant in the dropped table's life: the new table did not exist yet.
    assert_error(
        query_call(c, f"select count(*) from {TBL}", as_of_time=old_time),
        404,
        "version_not_found",
    )


def test_drop_if_match(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}])
    append(c, [{"id": 2}])
    before = len(event_ids(c))
    stale = drop(local_lake, headers={"If-Match": "1"})
    assert assert_error(stale, 409, "version_conflict")["details"]["current_version"] == 2
    new_only = drop(local_lake, headers={"If-Match": "-1"})
    assert assert_error(new_only, 409, "version_conflict")["details"]["current_version"] == 2
    assert len(event_ids(c)) == before
    assert detail(c)["version"] == 2

    assert ok(drop(local_lake, headers={"If-Match": '"2"'}))["version"] == 3
    assert_error(c.get(table_url()), 404, "table_not_found")


def test_drop_idempotency_key_replays_and_never_drops_the_new_table(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}, {"id": 2}])
    key = {"Idempotency-Key": "drop-orders-1"}
    first = ok(drop(local_lake, headers=key))
    assert first["replayed"] is False
    count = len(event_ids(c))

    again = ok(drop(local_lake, headers=key))
    assert again == {**first, "replayed": True}
    assert len(event_ids(c)) == count

    # The name is reused; a late retry of the same drop must not drop the new table.
    append(c, [{"id": 3}])
    count = len(event_ids(c))
    late = ok(drop(local_lake, headers=key))
    assert late == {**first, "replayed": True}
    assert len(event_ids(c)) == count
    assert query(c, f"select id from {TBL}") == [[3]]

    # The same key for another request: 422.
    append(c, [{"id": 1}], table="other")
    assert_error(drop(local_lake, "other", headers=key), 422, "idempotency_key_reused")
    assert detail(c, "other")["row_count"] == 1


def test_gc_deletes_a_dropped_tables_files_only(local_lake: Lake) -> None:
    c = local_lake.client
    settings = local_lake.settings
    append(c, [{"id": 1}])
    append(c, [{"id": 2}])
    ok(c.post(table_url(suffix="/rows"), params={"mode": "overwrite"}, json=[{"id": 3}]))
    append(c, [{"id": 7}], table="other")
    local_lake.sync()  # mirrors of the old table exist too
    old = stored_files(root(settings))
    assert len(old) == 4
    assert ok(drop(local_lake))["version"] == 4
    append(c, [{"id": 10, "s": "new"}])  # the name again, before and after the runners ran
    local_lake.sync()
    append(c, [{"id": 11, "s": "new"}])  # version 7
    live = {f["path"] for f in ok(c.get(table_url(suffix="/versions/7")))["files"]}
    other = {f["path"] for f in ok(c.get(table_url("other", "/versions/1")))["files"]}
    assert len(live) == 2 and len(other) == 1

    report = gc(settings)
    assert report.deleted == 3  # the dropped table's three files
    assert stored_files(root(settings)) == live | other
    assert query(c, f"select id from {TBL} order by id") == [[10], [11]]
    assert query(c, "select id from other") == [[7]]
    # Its mirrors are still readable: they reference the live files only.
    local_lake.sync()
    status = mirrors_of(local_lake)
    assert [r["id"] for r in delta_rows(status["delta"]["location"])] == [10, 11]
    assert [r["id"] for r in iceberg_rows(status["iceberg"]["metadata_location"])] == [10, 11]
    assert gc(settings).deleted == 0


# -- choosing the mirror formats --------------------------------------------------------


def test_set_mirrors(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}])
    before = len(event_ids(c))

    body = ok(put_mirrors(local_lake, ["delta"]))
    assert body["table"] == TBL and body["version"] == 2 and body["mirrors"] == ["delta"]
    assert body["event_id"] and body["replayed"] is False
    assert event_ids(c)[-1] == body["event_id"]
    assert all_events(local_lake)[-1] == ("MirrorsChanged", 2)
    assert events(c)[-1]["formats"] == ["delta"]
    assert history(c)[-1][:2] == (2, "MirrorsChanged")
    assert detail(c)["version"] == 2 and detail(c)["row_count"] == 1
    status = mirrors_of(local_lake)
    assert status["delta"]["enabled"] is True and status["iceberg"]["enabled"] is False
    assert status["iceberg"]["lag_versions"] == 0

    # The same set again: nothing to record.
    same = ok(put_mirrors(local_lake, ["delta", "delta"]))
    assert same == {**body, "event_id": None}
    assert len(event_ids(c)) == before + 1

    # Any order, duplicates: one sorted set.
    both = ok(put_mirrors(local_lake, ["iceberg", "delta", "iceberg"]))
    assert both["mirrors"] == ["delta", "iceberg"] and both["version"] == 3
    none = ok(put_mirrors(local_lake, []))
    assert none["mirrors"] == [] and none["version"] == 4
    assert [m["enabled"] for m in mirrors_of(local_lake).values()] == [False, False]
    assert len(event_ids(c)) == before + 3


def test_set_mirrors_refuses_bad_requests(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}])
    before = len(event_ids(c))
    url = table_url(suffix="/mirrors")

    bad = assert_error(put_mirrors(local_lake, ["delta", "hudi"]), 400, "invalid_mirror_format")
    assert "hudi" in bad["message"]
    assert_error(put_mirrors(local_lake, ["Delta"]), 400, "invalid_mirror_format")
    assert c.put(url, json={"formats": ["delta"], "extra": 1}).status_code == 400
    assert c.put(url, json={}).status_code == 400
    assert c.put(url, json={"formats": "delta"}).status_code == 400
    assert_error(put_mirrors(local_lake, ["delta"], table="nope"), 404, "table_not_found")
    stale = put_mirrors(local_lake, ["delta"], headers={"If-Match": "0"})
    assert assert_error(stale, 409, "version_conflict")["details"]["current_version"] == 1
    assert len(event_ids(c)) == before
    assert [m["enabled"] for m in mirrors_of(local_lake).values()] == [True, True]

    assert ok(drop(local_lake))["version"] == 2
    assert_error(put_mirrors(local_lake, ["delta"]), 404, "table_not_found")

    append(c, [{"id": 1}])  # created at 3, rows at 4
    stale = put_mirrors(local_lake, ["iceberg"], headers={"If-Match": "1"})
    assert_error(stale, 409, "version_conflict")
    assert ok(put_mirrors(local_lake, ["iceberg"], headers={"If-Match": "4"}))["version"] == 5


def test_set_mirrors_idempotency_key(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}])
    key = {"Idempotency-Key": "m-1"}
    first = ok(put_mirrors(local_lake, ["iceberg"], headers=key))
    count = len(event_ids(c))
    ok(put_mirrors(local_lake, ["delta"]))  # changed since
    again = ok(put_mirrors(local_lake, ["iceberg"], headers=key))
    assert again == {**first, "replayed": True}
    assert len(event_ids(c)) == count + 1
    assert [m["enabled"] for m in mirrors_of(local_lake).values()] == [True, False]
    assert_error(put_mirrors(local_lake, ["delta"], headers=key), 422, "idempotency_key_reused")


def test_turning_a_format_off_and_on_removes_and_republishes_it(local_lake: Lake) -> None:
    c = local_lake.client
    settings = local_lake.settings
    append(c, [{"id": 1}, {"id": 2}])
    local_lake.sync()
    path = table_dir(settings)
    assert (path / "_delta_log").is_dir() and any((path / "metadata").iterdir())

    ok(put_mirrors(local_lake, ["delta"]))
    append(c, [{"id": 3}])
    local_lake.sync()
    status = mirrors_of(local_lake)
    assert status["iceberg"] == {
        "format": "iceberg",
        "enabled": False,
        "location": None,
        "metadata_location": None,
        "version": None,
        "lag_versions": 0,
        "lag_seconds": 0.0,
        "published_at": None,
        "error": None,
        "note": None,
    }
    assert not (path / "metadata").exists() or not any((path / "metadata").iterdir())
    assert status["delta"]["version"] == 3 and status["delta"]["lag_versions"] == 0
    assert [r["id"] for r in delta_rows(status["delta"]["location"])] == [1, 2, 3]
    assert len(stored_files(root(settings))) == 2  # no data file was touched

    ok(put_mirrors(local_lake, ["iceberg"]))
    status = mirrors_of(local_lake)
    assert status["iceberg"]["lag_versions"] == 5 and status["iceberg"]["version"] is None
    local_lake.sync()
    status = mirrors_of(local_lake)
    assert not (path / "_delta_log").exists() or not any((path / "_delta_log").iterdir())
    assert status["delta"]["enabled"] is False and status["delta"]["version"] is None
    assert status["iceberg"]["version"] == 4 and status["iceberg"]["lag_versions"] == 0
    assert [r["id"] for r in iceberg_rows(status["iceberg"]["metadata_location"])] == [1, 2, 3]


# -- the LEDGERLAKE_MIRRORS default -----------------------------------------------------


def test_mirrors_setting_is_validated() -> None:
    assert Settings().mirror_formats == ("delta", "iceberg")
    assert Settings.from_env({}).mirror_formats == ("delta", "iceberg")
    assert Settings.from_env({"LEDGERLAKE_MIRRORS": "none"}).mirror_formats == ()
    assert Settings.from_env({"LEDGERLAKE_MIRRORS": "iceberg"}).mirror_formats == ("iceberg",)
    both = Settings.from_env({"LEDGERLAKE_MIRRORS": " Iceberg , delta "})
    assert both.mirror_formats == ("delta", "iceberg")
    for wrong in ("parquet", "delta,hudi", "delta;iceberg"):
        with pytest.raises(SystemExit):
            Settings.from_env({"LEDGERLAKE_MIRRORS": wrong})
        with pytest.raises(SystemExit):
            Settings(mirrors=wrong).validate()


@pytest.fixture
def iceberg_only(settings: Settings) -> Iterator[Lake]:
    yield from open_lake(msgspec.structs.replace(settings, mirrors="iceberg"))


def test_the_default_is_recorded_when_a_table_is_created(iceberg_only: Lake) -> None:
    lake = iceberg_only
    append(lake.client, [{"id": 1}])
    created = events(lake.client)[0]
    assert created["type"] == "TableCreated" and created["mirrors"] == ["iceberg"]
    status = mirrors_of(lake)
    assert status["delta"]["enabled"] is False and status["iceberg"]["enabled"] is True
    lake.sync()
    assert not (table_dir(lake.settings) / "_delta_log").exists()
    assert mirrors_of(lake)["iceberg"]["version"] == 1

    # Another default later changes only the tables created after it.
    with lake_with(msgspec.structs.replace(lake.settings, mirrors="none")) as later:
        append(later.client, [{"id": 2}])
        append(later.client, [{"id": 1}], table="fresh")
        assert events(later.client, "fresh")[0]["mirrors"] == []
        assert [m["enabled"] for m in mirrors_of(later, "fresh").values()] == [False, False]
        assert [m["lag_versions"] for m in mirrors_of(later, "fresh").values()] == [0, 0]
        assert mirrors_of(later)["iceberg"]["enabled"] is True
        later.sync()
        assert mirrors_of(later)["iceberg"]["version"] == 2
        assert not (table_dir(later.settings, "fresh") / "metadata").exists()
        assert not (table_dir(later.settings, "fresh") / "_delta_log").exists()
        assert [m["version"] for m in mirrors_of(later, "fresh").values()] == [None, None]


def test_a_re_created_table_takes_the_current_default(iceberg_only: Lake) -> None:
    lake = iceberg_only
    append(lake.client, [{"id": 1}])
    ok(put_mirrors(lake, ["delta"]))
    ok(drop(lake))
    append(lake.client, [{"id": 2}])
    assert [m["enabled"] for m in mirrors_of(lake).values()] == [False, True]


# -- the mirror status and lags ------------------------------------------------------------


def test_mirror_status_before_and_after_the_runners(lake: Lake) -> None:
    """On local disk and on S3."""
    c = lake.client
    append(c, [{"id": 1, "a": "x"}, {"id": 2, "a": "y"}])
    append(c, [{"id": 3, "a": "z"}])
    status = mirrors_of(lake)
    for fmt in FORMATS:
        assert status[fmt]["enabled"] is True
        assert status[fmt]["version"] is None and status[fmt]["published_at"] is None
        assert status[fmt]["lag_versions"] == 3  # versions 0, 1 and 2
        assert status[fmt]["lag_seconds"] >= 0 and status[fmt]["error"] is None

    lake.sync()
    status = mirrors_of(lake)
    table = detail(c)
    location = (lake.settings.storage_url or str(root(lake.settings))) + f"/{ORG}/{SUP}/{TBL}"
    for fmt in FORMATS:
        assert status[fmt]["version"] == table["version"] == 2
        assert status[fmt]["lag_versions"] == 0 and status[fmt]["lag_seconds"] == 0
        assert status[fmt]["error"] is None
        assert status[fmt]["location"] == location
        published = datetime.fromisoformat(status[fmt]["published_at"])
        assert published >= datetime.fromisoformat(table["updated_at"])
    assert status["delta"]["metadata_location"] is None
    meta = status["iceberg"]["metadata_location"]
    assert meta.startswith(location + "/metadata/") and meta.endswith(".metadata.json")

    append(c, [{"id": 4, "a": "w"}])
    behind = mirrors_of(lake)
    for fmt in FORMATS:
        assert behind[fmt]["version"] == 2 and behind[fmt]["lag_versions"] == 1
        assert behind[fmt]["lag_seconds"] > 0
    lake.sync()
    assert [mirrors_of(lake)[fmt]["version"] for fmt in FORMATS] == [3, 3]
    if lake.settings.storage_url is None:
        assert [r["id"] for r in delta_rows(location)] == [1, 2, 3, 4]
        meta = mirrors_of(lake)["iceberg"]["metadata_location"]
        assert [r["a"] for r in iceberg_rows(meta)] == ["x", "y", "z", "w"]


def test_the_status_of_a_dropped_table_is_not_the_new_ones(local_lake: Lake) -> None:
    c = local_lake.client
    append(c, [{"id": 1}, {"id": 2}])
    local_lake.sync()
    ok(drop(local_lake))
    append(c, [{"id": 3, "z": "new"}])  # created at 3, rows at 4: two versions behind
    status = mirrors_of(local_lake)
    for fmt in FORMATS:
        assert status[fmt]["version"] is None and status[fmt]["lag_versions"] == 2
        assert status[fmt]["published_at"] is None


def test_drop_removes_the_mirrors(local_lake: Lake) -> None:
    c = local_lake.client
    settings = local_lake.settings
    append(c, [{"id": 1}, {"id": 2}])
    local_lake.sync()
    path = table_dir(settings)
    data = stored_files(root(settings))
    ok(drop(local_lake))
    local_lake.sync()
    assert not (path / "_delta_log").exists() or not any((path / "_delta_log").iterdir())
    assert not (path / "metadata").exists() or not any((path / "metadata").iterdir())
    assert stored_files(root(settings)) == data  # data files wait for gc

    append(c, [{"id": 5, "z": "new"}])  # created at 3, rows at 4
    local_lake.sync()
    status = mirrors_of(local_lake)
    assert [status[f]["version"] for f in FORMATS] == [4, 4]
    assert delta_rows(status["delta"]["location"]) == [{"id": 5, "z": "new"}]
    assert iceberg_rows(status["iceberg"]["metadata_location"]) == [{"id": 5, "z": "new"}]
    assert DeltaTable(status["delta"]["location"]).version() == 0  # a new Delta table


def test_drop_and_re_create_between_two_runs(local_lake: Lake) -> None:
    """The runners see the drop and the new table in one batch."""
    c = local_lake.client
    append(c, [{"id": 1, "a": "old"}, {"id": 2, "a": "old"}])
    append(c, [{"id": 3, "a": "old"}])
    local_lake.sync()
    ok(drop(local_lake))
    append(c, [{"id": 5, "z": 1.5}])
    local_lake.sync()
    status = mirrors_of(local_lake)
    created = events(c)[-2]
    assert created["type"] == "TableCreated" and created["version"] == 4
    assert [status[f]["version"] for f in FORMATS] == [5, 5]
    assert delta_rows(status["delta"]["location"]) == [{"id": 5, "z": 1.5}]
    assert iceberg_rows(status["iceberg"]["metadata_location"]) == [{"id": 5, "z": 1.5}]
    marks = DeltaTable(status["delta"]["location"]).history(1)[0]
    assert marks["ledgerlake.incarnation"] == created["id"]
    assert marks["ledgerlake.position"] == events(c)[-1]["id"]


def test_health_and_metrics_report_every_projection(local_lake: Lake) -> None:
    c = local_lake.client
    names = ["catalog", "mirror-delta", "mirror-iceberg"]
    health = ok(c.get("/health"))
    assert sorted(health["projections"]) == names
    idle = {"lag_events": 0, "lag_seconds": 0.0}
    assert health["projections"]["catalog"] == idle
    for name in names[1:]:
        assert health["projections"][name] == {**idle, "failed_tables": 0}

    append(c, [{"id": 1}])  # TableCreated + RowsAppended
    append(c, [{"id": 2}])
    append(c, [{"id": 3}], table="other")
    lags = ok(c.get("/health"))["projections"]
    assert lags["mirror-delta"]["lag_events"] == 5
    assert lags["mirror-iceberg"]["lag_events"] == 5
    assert lags["catalog"]["lag_events"] == 7  # and the registry's OrgCreated, SuperCreated
    assert all(lag["lag_seconds"] > 0 for lag in lags.values())

    metrics = c.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    samples = dict(re.findall(r'^(\S+\{projection="[a-z-]+"\}) (\S+)$', metrics.text, re.M))
    for name in names:
        assert f'ledgerlake_projection_lag_seconds{{projection="{name}"}}' in samples
    events_of = {
        name: float(samples[f'ledgerlake_projection_lag_events{{projection="{name}"}}'])
        for name in names
    }
    assert events_of == {"catalog": 7, "mirror-delta": 5, "mirror-iceberg": 5}
    assert "# TYPE ledgerlake_projection_lag_events gauge" in metrics.text

    local_lake.sync()
    for lag in ok(c.get("/health"))["projections"].values():
        assert lag["lag_events"] == 0 and lag["lag_seconds"] == 0.0
    metrics_text = c.get("/metrics").text
    assert re.search(r'lag_events\{projection="mirror-delta"\} 0$', metrics_text, re.M)
    assert re.search(r'failed_tables\{projection="mirror-iceberg"\} 0$', metrics_text, re.M)
