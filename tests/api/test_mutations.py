"""Upserts, deletes, version details, restore, compaction, expiry and small-write
inlining, through the HTTP API against a real Redis."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from tests.api.lake import (
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
    table_url,
    upsert,
    upsert_call,
    version_of,
)
from tests.bodies import arrow_bytes

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
    body = upsert(client, [{"id": 2, "seen": "2023-11-14T22:13:19Z", "name": "old"}], newer_than="seen")
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


def test_upsert_rewrites_only_the_files_that_may_hold_the_keys(client: Client) -> None:
    append(client, [{"id": i, "name": f"n{i}"} for i in range(1, 11)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(11, 21)])
    append(client, [{"id": i, "name": f"n{i}"} for i in range(21, 31)])
    f1, f2, f3 = current_paths(client)
    body = upsert(client, [{"id": 15, "name": "X"}, {"id": 100, "name": "new"}])
    assert counts(body) == (1, 1, 0, 1)
    (event,) = upserted_events(client)
    assert event["removed_files"] == [f2]
    (added,) = event["files"]
    assert added["rows"] == 11  # the 9 kept rows of f2, then the 2 incoming rows
    # f1 and f3 are untouched
    assert current_paths(client) == [f1, f3, added["path"]]
    assert query(client, "select count(*), sum(id) from orders") == [[31, 465 + 100]]
    assert query(client, "select name from orders where id in (15, 100) order by id") == [
        ["X"],
        ["new"],
    ]


def test_upsert_rewrite_keeps_the_order_of_kept_rows(client: Client) -> None:
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


def test_delete_keeps_order_and_prunes_files(client: Client) -> None:
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
