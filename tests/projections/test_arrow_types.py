"""Type rules: normalization, lossless conforming, and the stored/DuckDB type mappings."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import duckdb
import pyarrow as pa
import pytest

from events.errors import TypeMismatch
from events.model import DataType, Field
from projections.arrow import (
    StatsAccumulator,
    conform,
    duckdb_type,
    from_arrow,
    normalize_array,
    normalize_type,
    to_arrow,
    type_name,
)

ROUND_TRIP = [
    pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint64(),
    pa.float32(), pa.float64(), pa.decimal128(12, 3), pa.string(), pa.binary(), pa.date32(),
    pa.time64("us"), pa.timestamp("us"), pa.timestamp("us", tz="UTC"), pa.list_(pa.int64()),
    pa.struct([("a", pa.string()), ("b", pa.list_(pa.float64()))]),
    pa.map_(pa.string(), pa.int32()),
]  # fmt: skip


@pytest.mark.parametrize("t", ROUND_TRIP, ids=str)
def test_arrow_round_trip_and_duckdb_accepts_the_type(t: pa.DataType) -> None:
    stored = from_arrow(t)
    assert to_arrow(stored) == t
    # the DuckDB type name is valid SQL
    duckdb.sql(f"SELECT CAST(NULL AS {duckdb_type(stored)}) AS x").fetchall()


def test_normalization_is_representation_only() -> None:
    assert normalize_type(pa.large_string()) == pa.string()
    assert normalize_type(pa.dictionary(pa.int8(), pa.string())) == pa.string()
    assert normalize_type(pa.timestamp("ns", tz="Europe/Paris")) == pa.timestamp("us", tz="UTC")
    assert normalize_type(pa.large_list(pa.time32("ms"))) == pa.list_(pa.time64("us"))


def test_nanoseconds_that_would_be_truncated_are_refused() -> None:
    arr = pa.chunked_array([pa.array([1_000_000_001], pa.timestamp("ns"))])
    with pytest.raises(TypeMismatch, match="without changing them"):
        normalize_array(arr, "ts")
    exact = pa.chunked_array([pa.array([1_000_000_000], pa.timestamp("ns"))])
    assert normalize_array(exact, "ts").type == pa.timestamp("us")


def test_unsupported_types_are_named() -> None:
    with pytest.raises(TypeMismatch, match="duration"):
        from_arrow(pa.duration("s"), "d")


INT64 = DataType(kind="int64")
F64 = DataType(kind="float64")


def col(values: list, t: pa.DataType | None = None) -> pa.ChunkedArray:
    return pa.chunked_array([pa.array(values, t)])


def test_widening_integers_is_allowed_narrowing_is_not() -> None:
    assert conform(col([1], pa.int32()), INT64, "x", text=False).type == pa.int64()
    with pytest.raises(TypeMismatch) as err:
        conform(col([1], pa.int64()), DataType(kind="int32"), "x", text=False)
    assert err.value.details == {"column": "x", "expected": "int32", "actual": "int64"}


def test_text_formats_convert_only_exact_values() -> None:
    assert conform(col([1, 2]), F64, "x", text=True).to_pylist() == [1.0, 2.0]
    with pytest.raises(TypeMismatch):
        conform(col([1, 2]), F64, "x", text=False)  # typed formats say what they mean
    with pytest.raises(TypeMismatch, match="does not convert exactly"):
        conform(col([2**53 + 1]), F64, "x", text=True)
    ts = DataType(kind="timestamp", tz="UTC")
    got = conform(col(["2026-01-02T03:04:05Z"]), ts, "x", text=True).to_pylist()
    assert got == [dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)]
    with pytest.raises(TypeMismatch):
        conform(col(["not a time"]), ts, "x", text=True)


def test_strings_never_become_numbers_and_null_columns_take_any_type() -> None:
    with pytest.raises(TypeMismatch, match="has type int64 but the data has string"):
        conform(col(["1"]), INT64, "x", text=True)
    assert conform(col([None, None]), INT64, "x", text=True).type == pa.int64()


def test_stats_accumulate_across_batches() -> None:
    acc = StatsAccumulator(DataType(kind="decimal", precision=5, scale=1))
    acc.add(pa.array([Decimal("9.5"), None], pa.decimal128(5, 1)))
    acc.add(pa.array([Decimal("10.0")], pa.decimal128(5, 1)))
    stats = acc.result()
    assert (stats.null_count, stats.min, stats.max) == (1, "9.5", "10.0")


def test_long_string_max_is_dropped_min_is_a_prefix() -> None:
    acc = StatsAccumulator(DataType(kind="string"))
    acc.add(pa.array(["a" * 100, "b" * 100]))
    stats = acc.result()
    assert stats.min is None and stats.max is None  # unknowable as bounds
    acc = StatsAccumulator(DataType(kind="string"))
    acc.add(pa.array(["a" * 100, "b"]))
    assert acc.result().min == "a" * 64 and acc.result().max == "b"


def test_type_names_are_readable() -> None:
    t = from_arrow(pa.struct([("a", pa.list_(pa.timestamp("us", tz="UTC")))]))
    assert type_name(t) == "struct<a: list<timestamp[UTC]>>"
    assert Field("x", t).nullable
