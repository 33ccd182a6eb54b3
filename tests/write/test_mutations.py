"""Upserts, deletes, version details, restore, compaction, expiry and small-write
inlining, through the HTTP API against a real Redis."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed
from tests.support.bodies import arrow_bytes, parquet_bytes
from tests.support.lake import (
    ARROW,
    ORG,
    TBL,
    Client,
    append,
    assert_error,
    current_paths,
    delete_call,
    detail,
    event_ids,
    events,
    history,
    ok,
    query,
    query_arrow,
    stored_files,
    table_url,
    upsert,
    upsert_call,
    version_of,
)

ALL = "select * from orders order by all"


def seed(client: Client, rows: list[dict[str, Any]] | None = None) -> int:
    rows = rows or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    return int(append(client, rows)["version"])


def upserted_events(client: Client) -> list[dict[str, Any]]:
    return [e for e in events(client) if e["type"] == "RowsUpserted"]


def counts(body: dict[str, Any]) -> tuple[int, int, int, int]:
    return body["inserted"], body["updated"], body["unchanged"], body["rows_removed"]


# -- upsert -----------------------------------------------------------------------------


def test_upsert_inserts_updates_and_skips_identical_rows(client: Client) -> None:
    assert seed(client) == 1
    body = upsert(client, [{"id": 2, "name": "B"}, {"id": 3, "name": "c"}, {"id": 4, "name": "d"}])
    assert body["table"] == TBL
    assert body["mode"] == "upsert"
    assert body["version"] == 2
    assert counts(body) == (1, 1, 1, 1)  # 4 inserted, 2 updated, 3 identical
    assert body["event_id"]
    assert body["replayed"] is False
    assert query(client, ALL) == [[1, "a"], [2, "B"], [3, "c"], [4, "d"]]
    assert detail(client)["row_count"] == 4
    (event,) = upserted_events(client)
    assert event["id"] == body["event_id"]
    assert event["key"] == ["id"]
    assert (event["inserted"], event["updated"], event["unchanged"], event["rows_removed"]) == (
        1, 1, 1, 1,
    )  # fmt: skip
    # history: an updated row is one removed and one added
    assert history(client)[-1] == (2, "RowsUpserted", 2, 1)


def test_upsert_in_batch_duplicates_last_occurrence_wins(client: Client) -> None:
    seed(client)
    body = upsert(
        client,
        [
            {"id": 2, "name": "first"},
            {"id": 5, "name": "x"},
            {"id": 2, "name": "last"},
            {"id": 5, "name": "y"},
        ],
    )
    assert counts(body) == (1, 1, 0, 1)
    assert query(client, ALL) == [[1, "a"], [2, "last"], [3, "c"], [5, "y"]]


def test_upsert_in_batch_duplicates_greatest_newer_than_wins(client: Client) -> None:
    seed(client, [{"id": 1, "v": 1, "name": "a"}])
    body = upsert(
        client,
        [
            {"id": 1, "v": 7, "name": "seven"},
            {"id": 1, "v": 9, "name": "nine"},
            {"id": 1, "v": None, "name": "null"},
            {"id": 1, "v": 8, "name": "eight"},
            {"id": 2, "v": 3, "name": "three"},
            {"id": 2, "v": 2, "name": "two"},
        ],
        newer_than="v",
    )
    assert counts(body) == (1, 1, 0, 1)
    assert query(client, "select id, v, name from orders order by id") == [
        [1, 9, "nine"],
        [2, 3, "three"],
    ]


def test_upsert_newer_than_skips_rows_not_newer_than_the_stored_one(client: Client) -> None:
    seed(
        client,
        [
            {"id": 1, "v": 5, "name": "a"},
            {"id": 2, "v": 5, "name": "b"},
            {"id": 3, "v": 5, "name": "c"},
            {"id": 4, "v": 5, "name": "d"},
            {"id": 5, "v": None, "name": "e"},
        ],
    )
    body = upsert(
        client,
        [
            {"id": 1, "v": 3, "name": "older"},  # older: skipped
            {"id": 2, "v": 5, "name": "same-v"},  # not newer: skipped
            {"id": 3, "v": 6, "name": "newer"},  # newer: applied
            {"id": 4, "v": None, "name": "null"},  # an incoming null is never newer
            {"id": 5, "v": 1, "name": "over-null"},  # a stored null is the oldest
            {"id": 6, "v": None, "name": "new"},  # no stored row: inserted
        ],
        newer_than="v",
    )
    assert counts(body) == (1, 2, 3, 2)
    assert query(client, "select id, v, name from orders order by id") == [
        [1, 5, "a"],
        [2, 5, "b"],
        [3, 6, "newer"],
        [4, 5, "d"],
        [5, 1, "over-null"],
        [6, None, "new"],
    ]
    (event,) = upserted_events(client)
    assert event["newer_than"] == "v"


def ts_rows(ids: list[int], micros: list[int | None], names: list[str]) -> bytes:
    return arrow_bytes(
        pa.table({
            "id": pa.array(ids, pa.int64()),
            "seen": pa.array(micros, pa.timestamp("us", tz="UTC")),
            "name": names,
        })
    )  # fmt: skip


def test_upsert_newer_than_with_timestamps(client: Client) -> None:
    headers = {"content-type": ARROW}
    path = table_url(suffix="/rows")
    params = {"mode": "upsert", "key": "id", "newer_than": "seen"}
    t0 = 1_700_000_000_000_000
    r = client.post(path, content=ts_rows([1, 2], [t0, None], ["a", "b"]), headers=headers)
    assert ok(r)["version"] == 1
    stale = ts_rows([1, 2], [t0 - 1, None], ["x", "x"])
    body = ok(client.post(path, params=params, content=stale, headers=headers))
    assert counts(body) == (0, 0, 2, 0)
    assert body["event_id"] is None
    fresh = ts_rows([1, 2, 1], [t0 + 1, t0, t0 + 2], ["y", "z", "w"])
    body = ok(client.post(path, params=params, content=fresh, headers=headers))
    assert counts(body) == (0, 2, 0, 2)
    assert query(client, "select id, epoch_us(seen), name from orders order by id") == [
        [1, t0 + 2, "w"],
        [2, t0, "z"],
    ]
    # a JSON body's ISO strings are parsed against the stored timestamp column
    old = [{"id": 2, "seen": "2023-11-14T22:13:19Z", "name": "old"}]
    body = upsert(client, old, newer_than="seen")
    assert counts(body) == (0, 0, 1, 0)


def test_upsert_into_a_missing_table_creates_it(client: Client) -> None:
    body = upsert(client, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 1, "name": "c"}])
    assert body["version"] == 1
    assert counts(body) == (2, 0, 0, 0)
    assert query(client, ALL) == [[1, "c"], [2, "b"]]
    assert history(client) == [(0, "TableCreated", 0, 0), (1, "RowsUpserted", 2, 0)]
    assert [o["name"] for o in ok(client.get("/v1/orgs"))["orgs"]] == [ORG]
    cols = [(c["name"], c["type"]) for c in detail(client)["columns"]]
    assert cols == [("id", "int64"), ("name", "string")]


def test_noop_upsert_appends_nothing(client: Client) -> None:
    seed(client)
    before = event_ids(client)
    body = upsert(client, [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}])
    assert body["event_id"] is None
    assert body["version"] == 1
    assert counts(body) == (0, 0, 2, 0)
    assert body["replayed"] is False
    assert event_ids(client) == before
    assert version_of(client) == 1


@pytest.fixture
def cow_client(settings: Settings) -> Iterator[Client]:
    """A client of a deployment with deletion vectors off: copy-on-write changes."""
    cow = msgspec.structs.replace(settings, deletion_vectors=False)
    assert cow.redis_url
    with authed(TestClient(create_app(cow, cow.redis_url))) as c:
        yield c


def test_upsert_rewrites_only_the_files_that_may_hold_the_keys(cow_client: Client) -> None:
    client = cow_client
    append(client, [{"id": i, "name": f"n{i}"} for i in range(1, 11)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(11, 21)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(21, 31)])
    f1, f2, f3 = current_paths(client)
    body = upsert(client, [{"id": 15, "name": "X"}, {"id": 100, "name": "new"}])
    assert counts(body) == (1, 1, 0, 1)
    (event,) = upserted_events(client)
    assert event["removed_files"] == [f2]
    assert event.get("deletes", []) == []
    (added,) = event["files"]
    assert added["rows"] == 11  # the 9 kept rows of f2, then the 2 incoming rows
    # f1 and f3 are untouched
    assert current_paths(client) == [f1, f3, added["path"]]
    assert query(client, "select count(*), sum(id) from orders") == [[31, 465 + 100]]
    assert query(client, "select name from orders where id in (15, 100) order by id") == [
        ["X"],
        ["new"],
    ]


def test_upsert_deletes_replaced_rows_in_place_and_writes_only_the_incoming(
    client: Client,
) -> None:
    append(client, [{"id": i, "name": f"n{i}"} for i in range(1, 11)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(11, 21)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(21, 31)])
    f1, f2, f3 = current_paths(client)
    body = upsert(client, [{"id": 15, "name": "X"}, {"id": 100, "name": "new"}])
    assert counts(body) == (1, 1, 0, 1)
    (event,) = upserted_events(client)
    assert event["removed_files"] == []
    # id 15 is row 4 of f2: its position joins f2's deletion vector.
    (deletes,) = event["deletes"]
    assert (deletes["path"], deletes["count"]) == (f2, 1)
    assert base64.b64decode(deletes["positions"]) == (4).to_bytes(4, "little")
    (added,) = event["files"]
    assert added["rows"] == 2  # only the incoming rows
    assert current_paths(client) == [f1, f2, f3, added["path"]]
    version = version_of(client)
    files = {
        f["path"]: f for f in ok(client.get(table_url(suffix=f"/versions/{version}")))["files"]
    }
    assert (files[f2]["rows"], files[f2]["deleted_rows"]) == (10, 1)
    assert detail(client)["row_count"] == 31
    assert query(client, "select count(*), sum(id) from orders") == [[31, 465 + 100]]
    assert query(client, "select name from orders where id in (15, 100) order by id") == [
        ["X"],
        ["new"],
    ]


def test_upsert_rewrite_keeps_the_order_of_kept_rows(cow_client: Client) -> None:
    client = cow_client
    append(client, [{"id": i, "name": f"n{i}"} for i in (5, 3, 9, 1, 7)])
    upsert(client, [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}])
    assert query(client, "select id, name from orders") == [
        [5, "n5"],
        [3, "n3"],
        [1, "n1"],
        [7, "n7"],
        [9, "nine"],
        [2, "two"],
    ]


def test_rows_deleted_in_place_keep_the_order_of_the_others(client: Client) -> None:
    append(client, [{"id": i, "name": f"n{i}"} for i in (5, 3, 9, 1, 7)])
    upsert(client, [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}])
    rows = query(client, "select id, name from orders")
    # (Where the new file's rows land among the others is the scan's choice.)
    assert [r for r in rows if r[1].startswith("n") and r[1][1:].isdigit()] == [
        [5, "n5"],
        [3, "n3"],
        [1, "n1"],
        [7, "n7"],
    ]
    assert sorted(rows) == [[1, "n1"], [2, "two"], [3, "n3"], [5, "n5"], [7, "n7"], [9, "nine"]]


@pytest.mark.parametrize("mode", ["in-place", "copy-on-write"])
@pytest.mark.parametrize("column", ["file_index", "FileName", "__ll_pos"])
def test_columns_named_like_the_scans_own_are_changed_exactly(
    request: pytest.FixtureRequest, column: str, mode: str
) -> None:
    """A column named like DuckDB's virtual columns (which it shadows) or our scan's
    helper columns changes nothing in how rows are found, deleted and read."""
    client = request.getfixturevalue("client" if mode == "in-place" else "cow_client")
    append(client, [{"id": i, column: 100 + i} for i in range(1, 11)])
    append(client, [{"id": i, column: 100 + i} for i in range(11, 21)])
    assert counts(upsert(client, [{"id": 2, column: 7}, {"id": 19, column: 8}])) == (0, 2, 0, 2)
    assert ok(delete_call(client, {"keys": {"id": [4, 16]}}))["rows_removed"] == 2
    assert ok(delete_call(client, {"where": f'"{column}" = 103'}))["rows_removed"] == 1
    expected = {i: 100 + i for i in range(1, 21) if i not in (3, 4, 16)} | {2: 7, 19: 8}
    rows = query(client, f'select id, "{column}" from orders order by id')
    assert rows == [[i, v] for i, v in sorted(expected.items())]
    if mode == "in-place":
        changes = [e for e in events(client) if e["type"] in ("RowsUpserted", "RowsDeleted")]
        assert len(changes) == 3
        assert all(e["removed_files"] == [] for e in changes)


def test_a_column_named_file_row_number_is_refused(client: Client) -> None:
    seed(client)
    before = events(client)
    r = client.post(table_url(suffix="/rows"), json=[{"id": 1, "File_Row_Number": 2}])
    assert_error(r, 400, "reserved_column_name")
    assert events(client) == before


def test_upsert_with_a_composite_key(client: Client) -> None:
    append(
        client,
        [
            {"region": "eu", "id": 1, "amount": 10},
            {"region": "us", "id": 1, "amount": 20},
            {"region": "eu", "id": 2, "amount": 30},
        ],
    )
    body = upsert(
        client,
        [{"region": "us", "id": 1, "amount": 21}, {"region": "us", "id": 2, "amount": 40}],
        key="region,id",
    )
    assert counts(body) == (1, 1, 0, 1)
    assert query(client, "select region, id, amount from orders order by region, id") == [
        ["eu", 1, 10],
        ["eu", 2, 30],
        ["us", 1, 21],
        ["us", 2, 40],
    ]
    assert upserted_events(client)[0]["key"] == ["region", "id"]


def test_upsert_replaces_every_stored_row_of_a_duplicated_key(client: Client) -> None:
    append(client, [{"id": 1, "name": "a"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    # identical to the stored rows, but there are two of them: an update to one row
    body = upsert(client, [{"id": 1, "name": "a"}])
    assert counts(body) == (0, 1, 0, 2)
    assert query(client, ALL) == [[1, "a"], [2, "b"]]
    assert history(client)[-1] == (2, "RowsUpserted", 1, 2)


def test_upsert_with_a_new_column_evolves_the_schema(client: Client) -> None:
    seed(client)
    body = upsert(client, [{"id": 2, "name": "b", "note": "hi"}])
    assert body["version"] == 3  # SchemaEvolved (2) + RowsUpserted (3)
    assert counts(body) == (0, 1, 0, 1)
    assert [h[:2] for h in history(client)[-2:]] == [(2, "SchemaEvolved"), (3, "RowsUpserted")]
    assert query(client, "select id, name, note from orders order by id") == [
        [1, "a", None],
        [2, "b", "hi"],
        [3, "c", None],
    ]


def test_upsert_body_may_omit_non_key_columns(client: Client) -> None:
    seed(client, [{"id": 1, "name": "a", "qty": 5}])
    body = upsert(client, [{"id": 1, "qty": 6}])
    assert counts(body) == (0, 1, 0, 1)
    # an upsert replaces the whole row: a column the body lacks becomes null
    assert query(client, "select id, name, qty from orders") == [[1, None, 6]]


@pytest.mark.parametrize(
    ("params", "rows", "code"),
    [
        ({"mode": "upsert"}, [{"id": 1}], "invalid_key"),
        ({"mode": "upsert", "key": ""}, [{"id": 1}], "invalid_key"),
        ({"mode": "upsert", "key": "id,id"}, [{"id": 1}], "invalid_key"),
        ({"mode": "upsert", "key": "nope"}, [{"id": 1}], "invalid_key"),
        ({"mode": "upsert", "key": "id"}, [{"name": "x"}], "missing_key_column"),
        ({"mode": "upsert", "key": "id", "newer_than": "v"}, [{"id": 1}], "invalid_newer_than"),
        ({"mode": "upsert", "key": "id", "newer_than": "ok"}, [{"id": 1, "ok": True}],
         "invalid_key"),
        ({"mode": "upsert", "key": "tags"}, [{"id": 1, "tags": ["x"]}], "invalid_key"),
        ({"mode": "append", "key": "id"}, [{"id": 1}], "invalid_mode"),
        ({"newer_than": "id"}, [{"id": 1}], "invalid_mode"),
    ],
    ids=["no_key", "empty_key", "key_twice", "unknown_key", "body_without_key", "no_newer_than",
         "bool_newer_than", "list_key", "key_with_append", "newer_than_with_append"],
)  # fmt: skip
def test_bad_upserts_are_rejected_and_append_nothing(
    client: Client, params: dict[str, str], rows: list[dict[str, Any]], code: str
) -> None:
    seed(client)
    before = event_ids(client)
    r = client.post(table_url(suffix="/rows"), params=params, json=rows)
    assert_error(r, 400, code)
    assert event_ids(client) == before
    assert query(client, ALL) == [[1, "a"], [2, "b"], [3, "c"]]


def test_upsert_type_mismatch_is_422(client: Client) -> None:
    seed(client)
    before = event_ids(client)
    assert_error(upsert_call(client, [{"id": "x", "name": "a"}]), 422, "type_mismatch")
    assert event_ids(client) == before


def test_upsert_idempotency_key_replays_the_first_result(client: Client) -> None:
    seed(client)
    headers = {"Idempotency-Key": "up-1"}
    rows = [{"id": 2, "name": "B"}, {"id": 9, "name": "z"}]
    first = upsert(client, rows, headers=headers)
    after_first = event_ids(client)
    again = upsert(client, rows, headers=headers)
    assert again == {**first, "replayed": True}
    assert event_ids(client) == after_first
    assert query(client, ALL) == [[1, "a"], [2, "B"], [3, "c"], [9, "z"]]
    # the same key for another body (or another key column) is refused
    other = upsert_call(client, [{"id": 2, "name": "C"}], headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    other_key = upsert_call(client, rows, key="name", headers=headers)
    assert_error(other_key, 422, "idempotency_key_reused")
    assert event_ids(client) == after_first


def test_idempotency_key_of_a_noop_change_is_not_reusable_for_another(client: Client) -> None:
    seed(client)
    headers = {"Idempotency-Key": "noop-1"}
    first = upsert(client, [{"id": 1, "name": "a"}], headers=headers)
    assert (first["event_id"], first["unchanged"]) == (None, 1)
    before = event_ids(client)
    # A change that had nothing to do still records its key (and a retry replays it).
    again = upsert(client, [{"id": 1, "name": "a"}], headers=headers)
    assert (again["replayed"], again["event_id"], again["unchanged"]) == (True, None, 1)
    other = upsert_call(client, [{"id": 1, "name": "zzz"}], headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    assert event_ids(client) == before
    assert query(client, ALL) == [[1, "a"], [2, "b"], [3, "c"]]


def test_idempotency_key_of_a_noop_delete_is_not_reusable_for_another(client: Client) -> None:
    seed(client)
    headers = {"Idempotency-Key": "noop-2"}
    first = ok(delete_call(client, {"keys": {"id": [99]}}, headers=headers))
    assert (first["event_id"], first["rows_removed"]) == (None, 0)
    before = event_ids(client)
    # As above, for a delete that matched nothing.
    other = delete_call(client, {"keys": {"id": [1]}}, headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    assert event_ids(client) == before


def test_upsert_if_match(client: Client) -> None:
    seed(client)
    stale = upsert_call(client, [{"id": 1, "name": "x"}], headers={"If-Match": '"0"'})
    error = assert_error(stale, 409, "version_conflict")
    assert error["details"]["current_version"] == 1
    assert query(client, "select name from orders where id = 1") == [["a"]]
    good = upsert_call(client, [{"id": 1, "name": "x"}], headers={"If-Match": '"1"'})
    assert ok(good)["version"] == 2
    assert good.headers["etag"] == '"2"'
    fresh = upsert_call(client, [{"id": 1}], table="fresh", headers={"If-Match": "-1"})
    assert ok(fresh)["version"] == 1


# -- delete -----------------------------------------------------------------------------


def test_delete_by_keys(client: Client) -> None:
    seed(client)
    r = delete_call(client, {"keys": {"id": [1, 3, 42]}})
    body = ok(r)
    assert body["table"] == TBL
    assert body["version"] == 2
    assert body["rows_removed"] == 2
    assert body["event_id"]
    assert body["replayed"] is False
    assert r.headers["etag"] == '"2"'
    assert query(client, ALL) == [[2, "b"]]
    assert history(client)[-1] == (2, "RowsDeleted", 0, 2)
    (event,) = [e for e in events(client) if e["type"] == "RowsDeleted"]
    assert event["keys"] == {"id": [1, 3, 42]}
    assert event["rows_removed"] == 2


def test_delete_by_composite_keys_zips_the_columns(client: Client) -> None:
    append(
        client,
        [
            {"region": "eu", "id": 1},
            {"region": "eu", "id": 2},
            {"region": "us", "id": 1},
            {"region": "us", "id": 2},
        ],
    )
    body = ok(delete_call(client, {"keys": {"region": ["eu", "us"], "id": [1, 2]}}))
    assert body["rows_removed"] == 2
    assert query(client, "select region, id from orders order by all") == [["eu", 2], ["us", 1]]


def test_delete_by_where(client: Client) -> None:
    append(
        client,
        [
            {"id": 1, "region": "eu", "amount": -5},
            {"id": 2, "region": "eu", "amount": 10},
            {"id": 3, "region": "us", "amount": -1},
            {"id": 4, "region": None, "amount": -2},
        ],
    )
    body = ok(delete_call(client, {"where": "region = 'eu' and amount < 0"}))
    assert body["rows_removed"] == 1
    assert query(client, "select id from orders order by id") == [[2], [3], [4]]
    (event,) = [e for e in events(client) if e["type"] == "RowsDeleted"]
    assert event["where"] is not None and "amount" in event["where"]
    # a NULL result does not delete
    body = ok(delete_call(client, {"where": "region <> 'eu'"}))
    assert body["rows_removed"] == 1
    assert query(client, "select id from orders order by id") == [[2], [4]]
    body = ok(delete_call(client, {"where": "lower(coalesce(region, 'x')) like 'x%'"}))
    assert body["rows_removed"] == 1
    assert query(client, "select id from orders order by id") == [[2]]


def test_delete_keeps_order_and_prunes_files(cow_client: Client) -> None:
    client = cow_client
    append(client, [{"id": i} for i in (5, 3, 9, 1)])
    append(client, [{"id": i} for i in (20, 30)])
    f1, f2 = current_paths(client)
    body = ok(delete_call(client, {"keys": {"id": [3, 1]}}))
    assert body["rows_removed"] == 2
    (event,) = [e for e in events(client) if e["type"] == "RowsDeleted"]
    assert event["removed_files"] == [f1]
    (added,) = event["files"]
    assert added["rows"] == 2
    assert current_paths(client) == [f2, added["path"]]
    assert query(client, "select id from orders") == [[20], [30], [5], [9]]


def test_delete_in_place_writes_no_file_and_prunes_by_stats(client: Client) -> None:
    append(client, [{"id": i} for i in (5, 3, 9, 1, 8, 6)])
    append(client, [{"id": i} for i in (20, 30)])
    f1, f2 = current_paths(client)
    body = ok(delete_call(client, {"keys": {"id": [3, 1]}}))
    assert body["rows_removed"] == 2
    (event,) = [e for e in events(client) if e["type"] == "RowsDeleted"]
    assert (event["removed_files"], event["files"]) == ([], [])
    (deletes,) = event["deletes"]  # f2 (20..30) was pruned by its stats: not read
    assert (deletes["path"], deletes["count"]) == (f1, 2)
    assert current_paths(client) == [f1, f2]
    assert sorted(query(client, "select id from orders")) == [[5], [6], [8], [9], [20], [30]]
    assert detail(client)["row_count"] == 6


def test_deleting_every_row_of_a_file_adds_no_file(client: Client) -> None:
    append(client, [{"id": 1}, {"id": 2}])
    append(client, [{"id": 3}])
    f1, f2 = current_paths(client)
    ok(delete_call(client, {"where": "id <= 2"}))
    (event,) = [e for e in events(client) if e["type"] == "RowsDeleted"]
    assert (event["removed_files"], event["files"]) == ([f1], [])
    assert current_paths(client) == [f2]
    assert detail(client)["row_count"] == 1


def test_delete_matching_nothing_appends_nothing(client: Client) -> None:
    seed(client)
    before = event_ids(client)
    for body in ({"keys": {"id": [99]}}, {"where": "id > 100"}):
        result = ok(delete_call(client, body))
        assert result == {
            "table": TBL,
            "version": 1,
            "rows_removed": 0,
            "event_id": None,
            "replayed": False,
        }
    assert event_ids(client) == before


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"keys": {"id": [1]}, "where": "id = 1"}, 400, "invalid_delete"),
        ({}, 400, "invalid_delete"),
        ({"keys": None, "where": None}, 400, "invalid_delete"),
        ({"keys": {"nope": [1]}}, 400, "invalid_key"),
        ({"where": "nope = 1"}, 400, "invalid_where"),
        ({"where": "id in (select 1)"}, 400, "invalid_where"),
        ({"where": "exists (select * from orders)"}, 400, "invalid_where"),
        ({"where": "name in (select name from read_csv('/etc/passwd'))"}, 400, "invalid_where"),
        ({"where": "current_setting('threads') = '1'"}, 400, "invalid_where"),
        ({"where": "id"}, 400, "invalid_where"),
        ({"where": "1"}, 400, "invalid_where"),
        ({"where": "name"}, 400, "invalid_where"),
        ({"where": ""}, 400, "invalid_where"),
        ({"where": "id = 1; drop table orders"}, 400, "invalid_where"),
        ({"where": "orders.id = 1"}, 400, "invalid_where"),
        ({"where": "id = 'abc'"}, 400, "invalid_where"),
        ({"keys": {"id": [1]}, "extra": 1}, 400, "invalid_request"),
        ({"keys": {"id": [None]}}, 400, "null_key"),
        ({"keys": {"id": [1, 2], "name": ["a"]}}, 400, "invalid_key"),
        ({"keys": {"id": []}}, 400, "invalid_key"),
        ({"keys": {}}, 400, "invalid_key"),
        ({"keys": {"id": 1}}, 400, "invalid_request"),
        ({"keys": {"id": [1, "x"]}}, 422, "mixed_types"),
        ({"keys": {"id": ["x"]}}, 422, "type_mismatch"),
    ],
    ids=["keys_and_where", "neither", "both_null", "unknown_key_column", "unknown_where_column",
         "subquery", "exists", "read_csv", "current_setting", "where_int_column",
         "where_int_literal", "where_string_column", "empty_where", "two_statements",
         "qualified_column", "bad_constant", "unknown_field", "null_key", "mismatched_lengths",
         "empty_list", "empty_keys", "scalar_not_list", "mixed_key_types", "key_wrong_type"],
)  # fmt: skip
def test_bad_deletes_are_rejected_and_append_nothing(
    client: Client, body: dict[str, Any], status: int, code: str
) -> None:
    seed(client)
    before = event_ids(client)
    assert_error(delete_call(client, body), status, code)
    assert event_ids(client) == before
    assert query(client, ALL) == [[1, "a"], [2, "b"], [3, "c"]]


def test_where_failing_at_run_time_is_a_400_not_a_500(client: Client) -> None:
    seed(client)
    before = event_ids(client)
    # A conversion error found while reading the rows is a 400 ...
    assert_error(delete_call(client, {"where": "cast(name as int) = 1"}), 400, "invalid_where")
    # ... and so is an overflow.
    r = delete_call(client, {"where": "abs(id - 9223372036854775807 - 3) > 0"})
    assert_error(r, 400, "invalid_where")
    assert event_ids(client) == before
    assert query(client, ALL) == [[1, "a"], [2, "b"], [3, "c"]]


def test_delete_where_sees_a_later_column_as_null_in_older_files(client: Client) -> None:
    append(client, [{"id": 1}, {"id": 2}])
    append(client, [{"id": 3, "note": "x"}, {"id": 4, "note": None}])
    body = ok(delete_call(client, {"where": "note is null and id <> 2"}))
    assert body["rows_removed"] == 2
    assert query(client, "select id, note from orders order by id") == [[2, None], [3, "x"]]
    body = ok(delete_call(client, {"keys": {"note": ["x"]}}))
    assert body["rows_removed"] == 1
    assert query(client, "select id, note from orders") == [[2, None]]


UPSERT_BODIES = {
    "application/json": b'[{"id": 2, "name": "B"}, {"id": 4, "name": "d"}]',
    "application/x-ndjson": b'{"id": 2, "name": "B"}\n{"id": 4, "name": "d"}\n',
    "text/csv": b"id,name\n2,B\n4,d\n",
    "application/vnd.apache.parquet": parquet_bytes(
        pa.table({"id": pa.array([2, 4], pa.int32()), "name": ["B", "d"]})
    ),
    ARROW: arrow_bytes(pa.table({"id": pa.array([2, 4], pa.int64()), "name": ["B", "d"]})),
}


@pytest.mark.parametrize("content_type", list(UPSERT_BODIES))
def test_upsert_accepts_every_body_format(client: Client, content_type: str) -> None:
    seed(client)
    r = client.post(
        table_url(suffix="/rows"),
        params={"mode": "upsert", "key": "id"},
        content=UPSERT_BODIES[content_type],
        headers={"content-type": content_type},
    )
    assert counts(ok(r)) == (1, 1, 0, 1)
    assert query(client, ALL) == [[1, "a"], [2, "B"], [3, "c"], [4, "d"]]
    assert [c["type"] for c in detail(client)["columns"]] == ["int64", "string"]


def test_delete_from_a_missing_table_is_404(client: Client) -> None:
    assert_error(delete_call(client, {"keys": {"id": [1]}}), 404, "org_not_found")
    seed(client)
    before = event_ids(client)
    r = delete_call(client, {"keys": {"id": [1]}}, table="missing")
    assert_error(r, 404, "table_not_found")
    r = delete_call(client, {"where": "id = 1"}, table="missing")
    assert_error(r, 404, "table_not_found")
    assert event_ids(client) == before
    assert_error(client.get(table_url("missing")), 404, "table_not_found")


def test_delete_idempotency_key(client: Client) -> None:
    seed(client)
    headers = {"Idempotency-Key": "del-1"}
    first = ok(delete_call(client, {"keys": {"id": [1]}}, headers=headers))
    assert first["rows_removed"] == 1
    after_first = event_ids(client)
    again = ok(delete_call(client, {"keys": {"id": [1]}}, headers=headers))
    assert again == {**first, "replayed": True}
    assert event_ids(client) == after_first
    other = delete_call(client, {"keys": {"id": [2]}}, headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    assert event_ids(client) == after_first
    assert query(client, ALL) == [[2, "b"], [3, "c"]]


def test_delete_if_match(client: Client) -> None:
    seed(client)
    stale = delete_call(client, {"keys": {"id": [1]}}, headers={"If-Match": '"7"'})
    assert assert_error(stale, 409, "version_conflict")["details"]["current_version"] == 1
    assert detail(client)["row_count"] == 3
    good = delete_call(client, {"keys": {"id": [1]}}, headers={"If-Match": "1"})
    assert ok(good)["version"] == 2
    bad = delete_call(client, {"keys": {"id": [2]}}, headers={"If-Match": "abc"})
    assert_error(bad, 400, "invalid_if_match")


def test_upsert_null_keys_are_not_silently_merged(client: Client) -> None:
    append(client, [{"id": 1, "name": "s"}, {"id": None, "name": "t"}])
    r = upsert_call(client, [{"id": None, "name": "a"}, {"id": None, "name": "b"}])
    # A null key can match nothing: refused, as delete does, and nothing changes.
    assert_error(r, 400, "null_key")
    assert query(client, ALL) == [[1, "s"], [None, "t"]]


# -- compaction -------------------------------------------------------------------------


def compact_call(client: Client, table: str = TBL) -> Any:
    return client.post(table_url(table, "/compact"))


def snapshot(client: Client) -> tuple[pa.Table, pa.Table]:
    """The table's rows sorted, and in the order a plain scan returns them."""
    return query_arrow(client, ALL), query_arrow(client, "select * from orders")


def test_compaction_merges_small_files_without_changing_the_data(client: Client) -> None:
    append(client, [{"id": 5, "name": "e"}, {"id": 1, "name": "a"}])
    append(client, [{"id": 3, "name": "c"}])
    append(client, [{"id": 9, "name": "i", "score": 1.5}])  # a later column
    append(client, [{"id": 7, "name": None, "score": None}, {"id": 2, "name": "b"}])
    append(client, [{"id": 4, "name": "d", "score": -0.25}])
    before_files = current_paths(client)
    assert len(before_files) == 5
    version = version_of(client)
    sorted_before, scan_before = snapshot(client)
    assert scan_before.column("id").to_pylist() == [5, 1, 3, 9, 7, 2, 4]

    r = compact_call(client)
    body = ok(r)
    assert body == {
        "table": TBL,
        "version": version + 1,
        "files_removed": 5,
        "files_added": 1,
        "rows": 7,
        "event_id": body["event_id"],
    }
    assert body["event_id"]
    sorted_after, scan_after = snapshot(client)
    assert sorted_after.equals(sorted_before, check_metadata=True)
    assert scan_after.equals(scan_before)
    assert detail(client)["file_count"] == 1
    assert detail(client)["row_count"] == 7
    assert history(client)[-1] == (version + 1, "TableCompacted", 0, 0)
    (event,) = [e for e in events(client) if e["type"] == "TableCompacted"]
    assert event["removed_files"] == before_files
    assert event["rows"] == 7
    # the version before compaction still reads its own (now non-current) files
    assert query_arrow(client, ALL, as_of_version=version).equals(sorted_before)
    # nothing left to merge: a no-op
    again = ok(compact_call(client))
    assert again == {
        "table": TBL,
        "version": version + 1,
        "files_removed": 0,
        "files_added": 0,
        "rows": 0,
        "event_id": None,
    }


def test_compaction_keeps_a_column_typed_after_its_first_files(client: Client) -> None:
    append(client, [{"id": 1, "maybe": None}])
    append(client, [{"id": 2, "maybe": None}])
    append(client, [{"id": 3, "maybe": 5}])
    append(client, [{"id": 4}])
    sorted_before, scan_before = snapshot(client)
    assert sorted_before.schema.field("maybe").type == pa.int64()
    body = ok(compact_call(client))
    assert (body["files_removed"], body["files_added"], body["rows"]) == (4, 1, 4)
    sorted_after, scan_after = snapshot(client)
    assert sorted_after.equals(sorted_before)
    assert scan_after.equals(scan_before)
    rows = query(client, "select id, maybe from orders")
    assert rows == [[1, None], [2, None], [3, 5], [4, None]]


def test_compaction_waits_for_enough_small_files(client: Client) -> None:
    for i in range(3):
        append(client, [{"id": i}])
    before = event_ids(client)
    body = ok(compact_call(client))
    assert (body["event_id"], body["files_removed"], body["version"]) == (None, 0, 3)
    assert event_ids(client) == before
    append(client, [{"id": 3}])
    body = ok(compact_call(client))
    assert (body["files_removed"], body["files_added"], body["rows"]) == (4, 1, 4)


def test_compaction_of_a_missing_table_is_404(client: Client) -> None:
    append(client, [{"id": 1}])
    assert_error(compact_call(client, "nope"), 404, "table_not_found")


def test_compaction_around_a_large_file_keeps_every_row(settings: Settings) -> None:
    small = msgspec.structs.replace(settings, compact_small_bytes=20_000)
    assert small.redis_url
    with authed(TestClient(create_app(small, small.redis_url))) as client:
        append(client, [{"id": 1, "pad": "s"}])
        big = [{"id": 1000 + i, "pad": f"{i:06d}-" + "x" * (i % 97)} for i in range(3000)]
        append(client, big)
        for i in (2, 3, 4, 5):
            append(client, [{"id": i, "pad": "s"}])
        sizes = [f["size_bytes"] for f in ok(client.get(table_url(suffix="/versions/6")))["files"]]
        assert sizes[1] >= 20_000 and max(sizes[:1] + sizes[2:]) < 20_000
        digest = "select count(*), sum(hash(id, pad)) from orders"
        before = query(client, digest)
        sorted_before = query_arrow(client, ALL)
        body = ok(compact_call(client))
        assert (body["files_removed"], body["files_added"], body["rows"]) == (5, 1, 5)
        # The merged file joins the table after the large one: an unordered scan may
        # return rows in another order (only ORDER BY defines one), never other rows.
        assert query_arrow(client, ALL).equals(sorted_before)
        assert query(client, digest) == before


# -- small-write inlining -----------------------------------------------------------------


def inline_client(settings: Settings, **overrides: Any) -> TestClient[Any]:
    inline = msgspec.structs.replace(settings, inline_max_rows=100, **overrides)
    assert inline.redis_url
    return authed(TestClient(create_app(inline, inline.redis_url)))


def test_tiny_writes_are_inlined_and_queryable_at_once(settings: Settings) -> None:
    with inline_client(settings) as client:
        body = append(client, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        assert body["version"] == 1
        assert stored_files(settings.storage_root) == set()
        assert query(client, ALL) == [[1, "a"], [2, "b"]]
        d = detail(client)
        assert (d["inline_batches"], d["file_count"], d["row_count"]) == (1, 1, 2)
        (f,) = ok(client.get(table_url(suffix="/versions/1")))["files"]
        assert f["inline"] is True
        assert f["path"].startswith("inline/")
        assert f["rows"] == 2
        # a larger write still makes a Parquet file
        append(client, [{"id": 100 + i, "name": "x"} for i in range(101)])
        assert len(stored_files(settings.storage_root)) == 1
        assert detail(client)["inline_batches"] == 1
        assert query(client, "select count(*), sum(id) from orders") == [[103, 15_153]]


def test_upsert_and_delete_over_inlined_rows(settings: Settings) -> None:
    with inline_client(settings) as client:
        append(client, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        append(client, [{"id": 3, "name": "c"}])
        body = upsert(client, [{"id": 2, "name": "B"}, {"id": 4, "name": "d"}])
        assert counts(body) == (1, 1, 0, 1)
        assert query(client, ALL) == [[1, "a"], [2, "B"], [3, "c"], [4, "d"]]
        assert ok(delete_call(client, {"keys": {"id": [1, 3]}}))["rows_removed"] == 2
        assert query(client, ALL) == [[2, "B"], [4, "d"]]
        assert ok(delete_call(client, {"where": "name = 'd'"}))["rows_removed"] == 1
        assert query(client, ALL) == [[2, "B"]]
        assert stored_files(settings.storage_root) == set()
        d = detail(client)
        assert d["row_count"] == 1
        assert d["inline_batches"] == d["file_count"]
        assert history(client)[-3:] == [
            (3, "RowsUpserted", 2, 1),
            (4, "RowsDeleted", 0, 2),
            (5, "RowsDeleted", 0, 1),
        ]
        # past inlined versions stay queryable
        assert query(client, ALL, as_of_version=2) == [[1, "a"], [2, "b"], [3, "c"]]


def test_inlined_batches_are_flushed_into_one_parquet_file(settings: Settings) -> None:
    with inline_client(settings, inline_flush_files=3) as client:
        assert append(client, [{"id": 3, "name": "c"}])["version"] == 1
        assert append(client, [{"id": 1, "name": "a"}])["version"] == 2
        assert detail(client)["inline_batches"] == 2
        assert stored_files(settings.storage_root) == set()
        third = append(client, [{"id": 2, "name": "b"}, {"id": 0, "name": None}])
        assert third["version"] == 3
        # the third batch triggered the flush, before the write returned
        d = detail(client)
        assert (d["inline_batches"], d["file_count"], d["row_count"], d["version"]) == (
            0, 1, 4, 4,
        )  # fmt: skip
        assert len(stored_files(settings.storage_root)) == 1
        (f,) = ok(client.get(table_url(suffix="/versions/4")))["files"]
        assert f["inline"] is False
        assert history(client)[-1] == (4, "TableCompacted", 0, 0)
        (event,) = [e for e in events(client) if e["type"] == "TableCompacted"]
        assert event["actor"] == "ledgerlake"
        assert len(event["removed_files"]) == 3
        # the same rows, in the same order, as the inlined version 3
        assert query_arrow(client, ALL).equals(query_arrow(client, ALL, as_of_version=3))
        scan = "select * from orders"
        assert query_arrow(client, scan).equals(query_arrow(client, scan, as_of_version=3))
        assert query(client, "select id from orders") == [[3], [1], [2], [0]]
        assert query(client, ALL) == [[0, None], [1, "a"], [2, "b"], [3, "c"]]


def test_compact_endpoint_flushes_inlined_batches(settings: Settings) -> None:
    with inline_client(settings) as client:
        append(client, [{"id": 2, "name": "b"}])
        append(client, [{"id": 1, "name": "a"}])
        sorted_before, scan_before = snapshot(client)
        body = ok(compact_call(client))
        assert (body["files_removed"], body["files_added"], body["rows"]) == (2, 1, 2)
        assert detail(client)["inline_batches"] == 0
        assert len(stored_files(settings.storage_root)) == 1
        sorted_after, scan_after = snapshot(client)
        assert sorted_after.equals(sorted_before)
        assert scan_after.equals(scan_before)


def test_compaction_of_inlined_and_parquet_files_keeps_the_scan_order(settings: Settings) -> None:
    with inline_client(settings) as client:
        append(client, [{"id": -1}])  # inlined
        for start in (0, 200, 400, 600):
            append(client, [{"id": start + i} for i in range(101)])  # Parquet
        assert detail(client)["inline_batches"] == 1
        sorted_before, scan_before = snapshot(client)
        assert scan_before.column("id").to_pylist()[-1] == -1  # inlined rows come last
        body = ok(compact_call(client))
        assert (body["files_removed"], body["files_added"], body["rows"]) == (5, 1, 405)
        sorted_after, scan_after = snapshot(client)
        assert sorted_after.equals(sorted_before)
        # Merged in scan order: the Parquet files, then the inlined rows.
        assert scan_after.column("id").to_pylist() == scan_before.column("id").to_pylist()


def test_an_inlined_upsert_counts_towards_the_flush(settings: Settings) -> None:
    with inline_client(settings, inline_flush_files=3) as client:
        append(client, [{"id": 1, "name": "a"}])
        append(client, [{"id": 2, "name": "b"}])
        body = upsert(client, [{"id": 3, "name": "c"}])
        assert (body["version"], counts(body)) == (3, (1, 0, 0, 0))
        d = detail(client)
        assert (d["inline_batches"], d["file_count"], d["version"]) == (0, 1, 4)
        assert history(client)[-1] == (4, "TableCompacted", 0, 0)
        assert query(client, "select id, name from orders") == [[1, "a"], [2, "b"], [3, "c"]]
