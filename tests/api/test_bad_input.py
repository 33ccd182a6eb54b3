"""Bad input to the HTTP API: every rejection has the right status and error code, and
leaves no trace (no event in Redis, no data file, an empty staging directory)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import redis
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed
from tests.support.bodies import arrow_bytes, parquet_bytes

ORG, SUP, TBL = "acme", "sales", "orders"
ROWS = f"/v1/{ORG}/{SUP}/tables/{TBL}/rows"
SEED = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]

JSON = "application/json"
NDJSON = "application/x-ndjson"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
ARROW = "application/vnd.apache.arrow.stream"

# Where malformed bodies are sent: the seeded table, a new table in the seeded super,
# and a brand-new org (whose registry events must not appear either).
TARGETS = {
    "existing_table": ROWS,
    "new_table": f"/v1/{ORG}/{SUP}/tables/fresh/rows",
    "new_org": "/v1/neworg/newsup/tables/t/rows",
}


# -- helpers ----------------------------------------------------------------------------


SEED_TABLE = pa.table({"id": pa.array([1, 2], pa.int64()), "name": ["a", "b"]})


@dataclass(frozen=True)
class World:
    """Everything a write leaves behind, except the projector's own bookkeeping
    (snapshots, checkpoints, leases, consumer groups), which changes on its own."""

    streams: dict[bytes, list[bytes]]  # non-empty event streams -> entry ids
    records: dict[bytes, Any]  # versions, idempotency records, registry sets
    api_events: tuple[int, list[str]]  # GET /v1/events?org=ORG: status, event ids
    files: frozenset[str]  # every file under the test's directory, except staging


def world(client: TestClient[Any], settings: Settings) -> World:
    assert settings.redis_url
    r = redis.Redis.from_url(settings.redis_url)
    streams: dict[bytes, list[bytes]] = {}
    records: dict[bytes, Any] = {}
    try:
        for key in r.scan_iter(match=f"{settings.redis_prefix}:*", count=1000):
            kind = r.type(key)
            if kind == b"stream":
                ids = [entry_id for entry_id, _ in r.xrange(key)]
                if ids:  # consumer groups create empty streams with MKSTREAM
                    streams[key] = ids
            elif key.endswith(b":ver") or b":idem:" in key:
                records[key] = r.hgetall(key)
            elif kind == b"set":
                records[key] = r.smembers(key)
    finally:
        r.close()
    page = client.get("/v1/events", params={"org": ORG, "limit": 1000})
    event_ids = [e["id"] for e in page.json()["events"]] if page.status_code == 200 else []
    root = settings.data_dir.parent  # the test's own tmp_path: catches escapes too
    staging = settings.storage_root / "_staging"
    files = frozenset(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and staging not in p.parents
    )
    return World(streams, records, (page.status_code, event_ids), files)


def assert_unchanged(client: TestClient[Any], settings: Settings, before: World) -> None:
    after = world(client, settings)
    assert after.streams == before.streams, "an event was appended"
    assert after.records == before.records, "versions/registry/idempotency changed"
    assert after.api_events == before.api_events, "GET /v1/events changed"
    assert after.files == before.files, "a file was left behind"
    assert_staging_empty(settings)


def assert_staging_empty(settings: Settings) -> None:
    staging = settings.storage_root / "_staging"
    leftovers = list(staging.iterdir()) if staging.exists() else []
    assert leftovers == [], f"staging not cleaned up: {leftovers}"


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"].strip()
    return dict(error)


def post(client: TestClient[Any], path: str, body: bytes, content_type: str | None, **kw: Any):
    headers = dict(kw.pop("headers", {}))
    if content_type is not None:
        headers["content-type"] = content_type
    return client.post(path, content=body, headers=headers, **kw)


@pytest.fixture
def seeded(client: TestClient[Any]) -> TestClient[Any]:
    """acme/sales/orders with columns id int64, name string, at version 1."""
    r = client.post(ROWS, json=SEED)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    return client


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> str:
    return TARGETS[request.param]


def check_rejected(
    client: TestClient[Any],
    settings: Settings,
    path: str,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
    **kw: Any,
) -> dict[str, Any]:
    before = world(client, settings)
    error = assert_error(post(client, path, body, content_type, **kw), status, code)
    assert_unchanged(client, settings, before)
    return error


# -- malformed bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'[{"id": 1, "name": ',  # truncated
        b"{not json}",
        b'[{"id": 1}] trailing',
        b"[{'id': 1}]",  # single quotes
        b'[{"id": 1,}]',  # trailing comma
        b"\xff\xfe\x00\x01",
    ],
    ids=["truncated", "bare_word", "trailing_garbage", "single_quotes", "trailing_comma", "binary"],
)
def test_malformed_json_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, JSON, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [b'{"id": 1}', b"[1, 2]", b'"rows"', b"null", b"42", b"[[1, 2]]", b'[{"id": 1}, "x"]'],
    ids=["object", "array_of_ints", "string", "null", "number", "array_of_arrays", "mixed"],
)
def test_json_that_is_not_an_array_of_objects_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, JSON, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 1}\n{"id": ',
        b'{"id": 1}\nnot json\n',
        b'{"id": 1}\n[1]\n',
        b'{"id": 1} {"id": 2}\n',  # two objects on one line
    ],
    ids=["truncated", "bad_line", "array_line", "two_per_line"],
)
def test_malformed_ndjson_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, NDJSON, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [b"id,name\n1,a\n2\n", b"id,name\n1,a,extra\n", b"id,name\n1,a\n2,b\n3,c,d,e\n"],
    ids=["short_row", "long_row", "late_long_row"],
)
def test_ragged_csv_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, CSV, 400, "invalid_csv")


_GOOD_PARQUET = parquet_bytes(SEED_TABLE)
_GOOD_ARROW = arrow_bytes(SEED_TABLE)


@pytest.mark.parametrize(
    "body",
    [
        b"this is not parquet at all",
        b"PAR1" + b"\x00" * 64 + b"PAR1",
        _GOOD_PARQUET[: len(_GOOD_PARQUET) // 2],
        _GOOD_PARQUET[: len(_GOOD_PARQUET) // 2] + _GOOD_PARQUET[-8:],  # footer, no data
        _GOOD_ARROW,  # an Arrow stream is not Parquet
    ],
    ids=["text", "magic_only", "truncated", "cut_middle", "arrow_bytes"],
)
def test_garbage_parquet_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, PARQUET, 400, "invalid_parquet")


@pytest.mark.parametrize(
    "body",
    [
        b"this is not an arrow stream",
        b"\xff\xff\xff\xff" + b"\x00" * 12,
        _GOOD_ARROW[:-20],
        _GOOD_ARROW[: len(_GOOD_ARROW) - 60],
        _GOOD_PARQUET,  # Parquet is not an Arrow stream
    ],
    ids=["text", "bad_continuation", "truncated_end", "truncated_batch", "parquet_bytes"],
)
def test_garbage_arrow_stream_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, ARROW, 400, "invalid_arrow")


@pytest.mark.parametrize("content_type", [JSON, NDJSON, CSV, PARQUET, ARROW])
def test_empty_body_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, content_type: str
) -> None:
    check_rejected(seeded, settings, target, b"", content_type, 400, "empty_body")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b"[]"),
        (JSON, b"  [ ]  "),
        (NDJSON, b"\n\n"),
        (CSV, b"id,name\n"),
        (PARQUET, parquet_bytes(SEED_TABLE.slice(0, 0))),
        (ARROW, arrow_bytes(SEED_TABLE.slice(0, 0))),
    ],
    ids=["json", "json_spaces", "ndjson_blank_lines", "csv_header_only", "parquet", "arrow"],
)
def test_body_without_rows_is_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, content_type: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, content_type, 400, "no_rows")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/xml", "application/octet-stream", "multipart/form-data"],
    ids=["missing", "text_plain", "xml", "octet_stream", "multipart"],
)
def test_unsupported_content_type_is_415(
    seeded: TestClient[Any], settings: Settings, content_type: str | None
) -> None:
    body = b'[{"id": 3, "name": "c"}]'
    error = check_rejected(
        seeded, settings, ROWS, body, content_type, 415, "unsupported_media_type"
    )
    assert "application/json" in error["message"]  # tells what is supported


# -- names ------------------------------------------------------------------------------

BAD_NAMES = {
    "dotdot": "%2E%2E",
    "dot": "%2E",
    "dotted": "a.b",
    "upper": "A",
    "mixed_case": "Orders",
    "digit_first": "1abc",
    "dash": "a-b",
    "space": "a%20b",
    "nul": "a%00b",
    "non_ascii": "caf%C3%A9",
    "too_long_64": "a" * 64,
    "encoded_slash_traversal": "x%2F..%2Fy",
}


def _name_path(position: str, name: str) -> str:
    parts = {"org": ORG, "super": SUP, "table": TBL}
    parts[position] = name
    return f"/v1/{parts['org']}/{parts['super']}/tables/{parts['table']}/rows"


@pytest.mark.parametrize("position", ["org", "super", "table"])
@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_invalid_or_traversing_names_are_rejected(
    seeded: TestClient[Any], settings: Settings, position: str, name: str
) -> None:
    before = world(seeded, settings)
    r = seeded.post(_name_path(position, name), json=[{"id": 3, "name": "c"}])
    if "%2F" in name:
        # The decoded slash splits the path, so no route matches: 404 is as good as 400,
        # as long as nothing is written anywhere (inside or outside the storage root).
        assert (r.status_code, r.json()["error"]["code"]) in {
            (400, "invalid_name"),
            (404, "not_found"),
        }, r.text
    else:
        assert_error(r, 400, "invalid_name")
    assert_unchanged(seeded, settings, before)


def test_longest_valid_name_is_accepted(client: TestClient[Any]) -> None:
    """The 64-character rejection above is the limit, not a blanket refusal."""
    name = "a" * 63
    r = client.post(f"/v1/{name}/{name}/tables/{name}/rows", json=[{"id": 1}])
    assert r.status_code == 200, r.text
    assert r.json()["table"] == name


# -- body size --------------------------------------------------------------------------

LIMIT = 256


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient[Any]]:
    small = msgspec.structs.replace(settings, max_body_bytes=LIMIT)
    assert small.redis_url
    with authed(TestClient(create_app(small, small.redis_url))) as c:
        yield c


def _ndjson_rows(n: int) -> bytes:
    return b"".join(b'{"id": %d, "name": "row"}\n' % i for i in range(n))


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_body_over_the_limit_is_413(
    small_client: TestClient[Any], settings: Settings, chunked: bool
) -> None:
    body = _ndjson_rows(40)
    assert len(body) > LIMIT
    ok = small_client.post(ROWS, content=_ndjson_rows(2), headers={"content-type": NDJSON})
    assert ok.status_code == 200, ok.text  # under the limit: accepted
    before = world(small_client, settings)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64):
            yield body[i : i + 64]

    content: Any = chunks() if chunked else body
    r = small_client.post(ROWS, content=content, headers={"content-type": NDJSON})
    assert_error(r, 413, "payload_too_large")
    assert_unchanged(small_client, settings, before)


# -- reads of things that do not exist --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "params", "code"),
    [
        ("GET", "/v1/nope/supers", None, "org_not_found"),
        ("GET", "/v1/nope/sales/tables", None, "org_not_found"),
        ("GET", f"/v1/{ORG}/nope/tables", None, "super_not_found"),
        ("GET", "/v1/nope/sales/tables/orders", None, "org_not_found"),
        ("GET", f"/v1/{ORG}/nope/tables/orders", None, "super_not_found"),
        ("GET", f"/v1/{ORG}/{SUP}/tables/nope", None, "table_not_found"),
        ("GET", f"/v1/{ORG}/{SUP}/tables/nope/history", None, "table_not_found"),
        ("GET", f"/v1/{ORG}/nope/tables/orders/history", None, "super_not_found"),
        ("GET", "/v1/events", {"org": "nope"}, "org_not_found"),
        ("GET", "/v1/events", {"org": ORG, "super": "nope"}, "super_not_found"),
        ("POST", f"/v1/{ORG}/nope/query", None, "super_not_found"),
        ("POST", "/v1/nope/sales/query", None, "org_not_found"),
    ],
)
def test_unknown_org_super_table_is_404(
    seeded: TestClient[Any],
    settings: Settings,
    method: str,
    path: str,
    params: dict[str, str] | None,
    code: str,
) -> None:
    before = world(seeded, settings)
    if method == "GET":
        r = seeded.get(path, params=params)
    else:
        r = seeded.post(path, json={"sql": "select 1"})
    error = assert_error(r, 404, code)
    assert "nope" in error["message"]
    assert_unchanged(seeded, settings, before)


# -- schema and type errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "column", "expected", "actual"),
    [
        (JSON, b'[{"id": "three", "name": "c"}]', "id", "int64", "string"),
        (JSON, b'[{"id": 3.5, "name": "c"}]', "id", "int64", "float64"),
        (JSON, b'[{"id": 3, "name": 7}]', "name", "string", "int64"),
        (JSON, b'[{"id": true, "name": "c"}]', "id", "int64", "bool"),
        (NDJSON, b'{"id": 3, "name": ["c"]}\n', "name", "string", "list<string>"),
        (PARQUET, parquet_bytes(pa.table({"id": [3.5], "name": ["c"]})), "id", "int64", "float64"),
        (ARROW, arrow_bytes(pa.table({"id": [3], "name": [b"c"]})), "name", "string", "binary"),
    ],
    ids=["json_string", "json_float", "json_int_for_string", "json_bool", "ndjson_list",
         "parquet_float", "arrow_binary"],
)  # fmt: skip
def test_type_mismatch_on_second_write_is_422(
    seeded: TestClient[Any],
    settings: Settings,
    content_type: str,
    body: bytes,
    column: str,
    expected: str,
    actual: str,
) -> None:
    error = check_rejected(seeded, settings, ROWS, body, content_type, 422, "type_mismatch")
    assert error["details"] == {"column": column, "expected": expected, "actual": actual}
    assert column in error["message"]
    # the table is unchanged
    table = seeded.get(f"/v1/{ORG}/{SUP}/tables/{TBL}").json()
    assert table["version"] == 1
    assert table["row_count"] == 2


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'[{"id": 1, "v": 1}, {"id": 2, "v": "x"}]'),
        (JSON, b'[{"id": 1, "v": "x"}, {"id": 2, "v": 1}]'),
        (JSON, b'[{"id": 1, "v": true}, {"id": 2, "v": 1}]'),
        (JSON, b'[{"id": 1, "v": 1}, {"id": 2, "v": true}]'),
        (JSON, b'[{"id": 1, "v": 1.5}, {"id": 2, "v": true}]'),
        (JSON, b'[{"id": 1, "v": 1}, {"id": 2, "v": [1]}]'),
        (JSON, b'[{"id": 1, "v": {"x": 1}}, {"id": 2, "v": {"x": "s"}}]'),
        (JSON, b'[{"id": 1, "v": [1]}, {"id": 2, "v": ["s"]}]'),
        (NDJSON, b'{"id": 1, "v": 1}\n{"id": 2, "v": "x"}\n'),
    ],
    ids=["int_then_string", "string_then_int", "bool_then_int", "int_then_bool",
         "float_then_bool", "int_then_list", "struct_fields", "list_items", "ndjson"],
)  # fmt: skip
def test_mixed_types_in_one_batch_are_422(
    seeded: TestClient[Any], settings: Settings, target: str, content_type: str, body: bytes
) -> None:
    error = check_rejected(seeded, settings, target, body, content_type, 422, "mixed_types")
    assert error["details"]["column"] == "v"


@pytest.mark.parametrize(
    "body",
    [
        b'[{"id": 1, "v": 18446744073709551616}]',  # 2**64
        b'[{"id": 1, "v": 1}, {"id": 2, "v": 9223372036854775808}]',  # 2**63
        b'[{"id": 1, "v": -9223372036854775809}]',
    ],
    ids=["above_uint64", "above_int64_after_small", "below_int64"],
)
def test_integer_out_of_range_is_a_client_error(
    seeded: TestClient[Any], settings: Settings, body: bytes
) -> None:
    """An integer no column type can hold is bad input (4xx), not an internal error."""
    before = world(seeded, settings)
    r = post(seeded, TARGETS["new_table"], body, JSON)
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] != "internal_error"
    assert_unchanged(seeded, settings, before)


TYPED = pa.table(
    {
        "i": pa.array([1], pa.int64()),
        "f": pa.array([1.5], pa.float64()),
        "d": pa.array([dt.date(2024, 1, 1)], pa.date32()),
        "bo": pa.array([True], pa.bool_()),
        "ts": pa.array([dt.datetime(2024, 1, 1)], pa.timestamp("us")),
        "dec": pa.array([1], pa.decimal128(10, 2)),
    }
)
TYPED_ROWS = f"/v1/{ORG}/{SUP}/tables/typed/rows"


@pytest.mark.parametrize(
    ("column", "good", "bad", "expected"),
    [
        ("i", "2", "foo", "int64"),
        ("i", "2", "1.5", "int64"),
        ("f", "2.5", "abc", "float64"),
        ("d", "2024-01-02", "2024-13-45", "date"),
        ("bo", "false", "maybe", "bool"),
        ("ts", "2024-01-02 03:04:05", "yesterday", "timestamp"),
        ("dec", "2.50", "abc", "decimal(10,2)"),
        ("dec", "2.50", "1.234", "decimal(10,2)"),
    ],
    ids=["int_word", "int_fraction", "float_word", "date", "bool", "timestamp",
         "decimal_word", "decimal_too_precise"],
)  # fmt: skip
def test_csv_value_not_of_the_table_type_is_422(
    client: TestClient[Any], settings: Settings, column: str, good: str, bad: str, expected: str
) -> None:
    r = post(client, TYPED_ROWS, parquet_bytes(TYPED), PARQUET)
    assert r.status_code == 200, r.text
    ok = post(client, TYPED_ROWS, f"{column}\n{good}\n".encode(), CSV)
    assert ok.status_code == 200, ok.text  # a well-typed CSV value is accepted
    body = f"{column}\n{good}\n{bad}\n".encode()  # the bad value is on the second row
    error = check_rejected(client, settings, TYPED_ROWS, body, CSV, 422, "type_mismatch")
    assert error["details"] == {"column": column, "expected": expected, "actual": "string"}
    assert bad in error["message"]


# -- versions, modes, idempotency -------------------------------------------------------


@pytest.mark.parametrize("stale", ["0", "2", "7", '"0"', 'W/"5"'])
def test_stale_if_match_is_409_with_current_version(
    seeded: TestClient[Any], settings: Settings, stale: str
) -> None:
    body = b'[{"id": 3, "name": "c"}]'
    error = check_rejected(
        seeded, settings, ROWS, body, JSON, 409, "version_conflict", headers={"if-match": stale}
    )
    assert error["details"] == {"current_version": 1}
    ok = post(seeded, ROWS, body, JSON, headers={"if-match": "1"})  # the current one works
    assert ok.status_code == 200, ok.text
    assert ok.json()["version"] == 2


def test_if_match_on_a_table_that_does_not_exist_is_409(
    seeded: TestClient[Any], settings: Settings
) -> None:
    error = check_rejected(
        seeded,
        settings,
        TARGETS["new_table"],
        b'[{"id": 1}]',
        JSON,
        409,
        "version_conflict",
        headers={"if-match": "3"},
    )
    assert error["details"]["current_version"] < 0


@pytest.mark.parametrize("value", ["abc", "1.5", "one", "1-0", "0x1", "W/abc"])
def test_non_numeric_if_match_is_400(
    seeded: TestClient[Any], settings: Settings, value: str
) -> None:
    check_rejected(
        seeded,
        settings,
        ROWS,
        b'[{"id": 3, "name": "c"}]',
        JSON,
        400,
        "invalid_if_match",
        headers={"if-match": value},
    )


@pytest.mark.parametrize("mode", ["bogus", "replace", "APPEND", "", "append "])
def test_invalid_mode_is_400(seeded: TestClient[Any], settings: Settings, mode: str) -> None:
    check_rejected(
        seeded,
        settings,
        ROWS,
        b'[{"id": 3, "name": "c"}]',
        JSON,
        400,
        "invalid_mode",
        params={"mode": mode},
    )


@pytest.mark.parametrize(
    ("path", "params", "body"),
    [
        (ROWS, None, b'[{"id": 3, "name": "c"}, {"id": 4, "name": "d"}]'),  # other rows
        (ROWS, {"mode": "overwrite"}, b'[{"id": 3, "name": "c"}]'),  # other mode
        (f"/v1/{ORG}/{SUP}/tables/other/rows", None, b'[{"id": 3, "name": "c"}]'),
    ],
    ids=["different_body", "different_mode", "different_table"],
)
def test_idempotency_key_reused_for_a_different_request_is_422(
    seeded: TestClient[Any],
    settings: Settings,
    path: str,
    params: dict[str, str] | None,
    body: bytes,
) -> None:
    key = {"idempotency-key": "key-1"}
    first = post(seeded, ROWS, b'[{"id": 3, "name": "c"}]', JSON, headers=key)
    assert first.status_code == 200, first.text
    check_rejected(
        seeded,
        settings,
        path,
        body,
        JSON,
        422,
        "idempotency_key_reused",
        headers=key,
        params=params,
    )


def test_idempotency_key_with_the_same_body_replays(
    seeded: TestClient[Any], settings: Settings
) -> None:
    key = {"idempotency-key": "key-1"}
    body = b'[{"id": 3, "name": "c"}]'
    first = post(seeded, ROWS, body, JSON, headers=key)
    assert first.status_code == 200, first.text
    assert first.json()["replayed"] is False
    before = world(seeded, settings)
    again = post(seeded, ROWS, body, JSON, headers=key)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "replayed": True}
    assert_unchanged(seeded, settings, before)
    table = seeded.get(f"/v1/{ORG}/{SUP}/tables/{TBL}").json()
    assert table["row_count"] == 3
    # a different key with the same body is a new write
    other = post(seeded, ROWS, body, JSON, headers={"idempotency-key": "key-2"})
    assert other.status_code == 200, other.text
    assert other.json()["replayed"] is False
    assert other.json()["version"] == first.json()["version"] + 1


# -- duplicate column names -------------------------------------------------------------

_CASE_DUP = pa.table({"id": [1], "ID": [2]})


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'[{"id": 1, "ID": 2}]'),
        (JSON, b'[{"id": 1}, {"Id": 2}]'),  # across rows
        (NDJSON, b'{"id": 1, "ID": 2}\n'),
        (CSV, b"id,ID\n1,2\n"),
        (CSV, b"id,id\n1,2\n"),  # exact duplicate
        (PARQUET, parquet_bytes(_CASE_DUP)),
        (ARROW, arrow_bytes(_CASE_DUP)),
    ],
    ids=["json", "json_across_rows", "ndjson", "csv", "csv_exact", "parquet", "arrow"],
)
def test_duplicate_column_names_differing_in_case_are_rejected(
    seeded: TestClient[Any], settings: Settings, target: str, content_type: str, body: bytes
) -> None:
    check_rejected(seeded, settings, target, body, content_type, 400, "duplicate_column")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'[{"ID": 3, "name": "c"}]'),
        (CSV, b"id,Name\n3,c\n"),
        (PARQUET, parquet_bytes(pa.table({"Id": pa.array([3], pa.int64())}))),
    ],
    ids=["json", "csv", "parquet"],
)
def test_column_differing_only_in_case_from_the_table_is_rejected(
    seeded: TestClient[Any], settings: Settings, content_type: str, body: bytes
) -> None:
    check_rejected(seeded, settings, ROWS, body, content_type, 400, "column_case_mismatch")
