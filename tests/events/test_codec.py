"""Event codec: stream fields round-trip, ids come from the stream, old versions upcast."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import model, positions
from events.model import (
    CURRENT_VERSION,
    DataType,
    Field,
    RowsAppended,
    TableCreated,
    decode_event,
    encode_event,
    stream_id_tuple,
    to_builtins,
)

T0 = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)


def created() -> TableCreated:
    return TableCreated(
        org="o", super_="s", table="t", actor="me", time=T0, version=0,
        columns=(Field("x", DataType(kind="list", item=DataType(kind="int64"))),),
    )  # fmt: skip


def test_round_trip_sets_id_from_stream() -> None:
    fields = encode_event(created())
    assert fields["t"] == b"TableCreated"
    assert fields["tb"] == b"t"
    assert fields["v"] == str(CURRENT_VERSION).encode()
    assert b'"id"' not in fields["e"]  # the id is the stream entry id, not payload
    back = decode_event(b"5-1", {k.encode(): v for k, v in fields.items()})
    assert back == msgspec.structs.replace(created(), id="5-1")


def test_old_payload_versions_are_upcast_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hypothetical v0 payload named the row count "count"; the upcaster renames it.
    def v0_to_v1(data: dict) -> dict:
        data["rows"] = data.pop("count")
        return data

    monkeypatch.setitem(model.UPCASTERS, ("RowsAppended", 0), v0_to_v1)
    payload = msgspec.json.encode(
        {"type": "RowsAppended", "org": "o", "super": "s", "table": "t", "actor": "a",
         "time": T0, "version": 1, "files": [], "count": 7}
    )  # fmt: skip
    event = decode_event("9-0", {b"t": b"RowsAppended", b"v": b"0", b"e": payload})
    assert isinstance(event, RowsAppended)
    assert event.rows == 7
    assert event.id == "9-0"


def test_unknown_event_type_fails_loudly() -> None:
    payload = msgspec.json.encode({"type": "Nope", "org": "o", "actor": "a", "time": T0})
    with pytest.raises(msgspec.ValidationError):
        decode_event("1-0", {b"v": b"1", b"e": payload})


def test_audit_form_has_every_common_field() -> None:
    data = to_builtins(msgspec.structs.replace(created(), id="5-1"))
    assert data["type"] == "TableCreated"
    assert data["version"] == 0  # present even though it is the default
    assert data["super"] == "s"
    assert data["id"] == "5-1"
    assert data["request_id"] == ""


def test_stream_ids_compare_numerically() -> None:
    assert stream_id_tuple("10-0") > stream_id_tuple("9-5")
    assert stream_id_tuple("10-10") > stream_id_tuple("10-9")


@given(
    st.sets(st.integers(0, 2**32 - 1), max_size=200),
    st.sets(st.integers(0, 2**32 - 1), max_size=200),
)
def test_merge_positions_is_the_sorted_union(a: set[int], b: set[int]) -> None:
    packs = positions.pack_positions
    count, packed = positions.merge_positions(packs(a), packs(b))
    union = sorted(a | b)
    assert count == len(union)
    assert packed == positions.pack_positions(union)
    assert model.DeletionVector(1, count, packed).rows() == union


def test_remembered_merges_stay_within_their_budget() -> None:
    merged = positions._Merged(budget=200)
    merged.put((b"a" * 10, b"b" * 10), (1, b"c" * 10))  # 30 bytes
    assert merged.get((b"a" * 10, b"b" * 10)) == (1, b"c" * 10)
    merged.put((b"x" * 30, b""), (1, b"y" * 30))  # over a quarter of the budget: not kept
    assert merged.get((b"x" * 30, b"")) is None
    for i in range(6):
        merged.put((bytes([i]) * 10, b"k" * 10), (i, b"v" * 10))
    assert merged.used <= 200
    assert merged.get((b"a" * 10, b"b" * 10)) is None  # the oldest went first
    assert merged.get((bytes([5]) * 10, b"k" * 10)) == (5, b"v" * 10)
