"""Column types between Arrow, the stored ``DataType`` and DuckDB, and the rules for
putting incoming data into a table's schema.

Incoming columns are first *normalized* (representation only: dictionary decoded,
large_* to regular, timestamps and times to microseconds, any time zone to UTC). They are
then checked against the table's type. Only lossless conversions are made:

* null -> anything; a narrower integer -> a wider integer; float32 -> float64;
* for text formats (JSON, NDJSON, CSV), which carry no precise types: integers into any
  integer or float column when every value fits exactly, and ISO-8601 / decimal strings
  into date, time, timestamp and decimal columns when every value parses.

Anything else is a ``TypeMismatch`` naming the column, the expected and the actual type.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from events.errors import TypeMismatch
from events.model import ColumnStats, DataType, Field

_SIMPLE: dict[str, pa.DataType] = {
    "null": pa.null(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "time": pa.time64("us"),
}
_BY_ARROW = {str(v): k for k, v in _SIMPLE.items()}
_DUCKDB = {
    "null": "INTEGER",
    "bool": "BOOLEAN",
    "int8": "TINYINT",
    "int16": "SMALLINT",
    "int32": "INTEGER",
    "int64": "BIGINT",
    "uint8": "UTINYINT",
    "uint16": "USMALLINT",
    "uint32": "UINTEGER",
    "uint64": "UBIGINT",
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "string": "VARCHAR",
    "binary": "BLOB",
    "date": "DATE",
    "time": "TIME",
}
_INT_RANK = {"int8": 1, "int16": 2, "int32": 3, "int64": 4}
_UINT_RANK = {"uint8": 1, "uint16": 2, "uint32": 3, "uint64": 4}
_TEXT_PARSEABLE = {"date", "time", "timestamp", "decimal"}


def to_arrow(t: DataType) -> pa.DataType:
    """The Arrow type for a stored type."""
    if t.kind in _SIMPLE:
        return _SIMPLE[t.kind]
    if t.kind == "decimal":
        return pa.decimal128(t.precision or 38, t.scale or 0)
    if t.kind == "timestamp":
        return pa.timestamp("us", tz=t.tz)
    if t.kind == "list" and t.item is not None:
        return pa.list_(to_arrow(t.item))
    if t.kind == "map" and t.key is not None and t.item is not None:
        return pa.map_(to_arrow(t.key), to_arrow(t.item))
    if t.kind == "struct" and t.fields is not None:
        return pa.struct([pa.field(f.name, to_arrow(f.type)) for f in t.fields])
    raise ValueError(f"unknown stored type {t!r}")


def arrow_schema(columns: tuple[Field, ...]) -> pa.Schema:
    return pa.schema([pa.field(f.name, to_arrow(f.type)) for f in columns])


def from_arrow(t: pa.DataType, column: str = "") -> DataType:
    """The stored type of a *normalized* Arrow type; TypeMismatch if unsupported."""
    simple = _BY_ARROW.get(str(t))
    if simple is not None:
        return DataType(kind=simple)
    if pa.types.is_decimal(t) and t.precision <= 38:
        return DataType(kind="decimal", precision=t.precision, scale=t.scale)
    if pa.types.is_timestamp(t):
        return DataType(kind="timestamp", tz=t.tz)
    if pa.types.is_list(t):
        return DataType(kind="list", item=from_arrow(t.value_type, column))
    if pa.types.is_map(t):
        return DataType(
            kind="map", key=from_arrow(t.key_type, column), item=from_arrow(t.item_type, column)
        )
    if pa.types.is_struct(t):
        fields = tuple(Field(name=f.name, type=from_arrow(f.type, column)) for f in t)
        return DataType(kind="struct", fields=fields)
    raise TypeMismatch(
        f"column {column!r} has type {t}, which Ledgerlake does not store "
        "(supported: bool, integers, floats, decimal up to 38 digits, string, binary, date, "
        "time, timestamp, list, map, struct)",
        code="unsupported_type",
        column=column,
        actual=str(t),
    )


def type_name(t: DataType) -> str:
    """A readable type name, e.g. ``timestamp[UTC]`` or ``list<int64>``."""
    if t.kind == "decimal":
        return f"decimal({t.precision},{t.scale})"
    if t.kind == "timestamp":
        return f"timestamp[{t.tz}]" if t.tz else "timestamp"
    if t.kind == "list" and t.item:
        return f"list<{type_name(t.item)}>"
    if t.kind == "map" and t.key and t.item:
        return f"map<{type_name(t.key)}, {type_name(t.item)}>"
    if t.kind == "struct" and t.fields is not None:
        inner = ", ".join(f"{f.name}: {type_name(f.type)}" for f in t.fields)
        return f"struct<{inner}>"
    return t.kind


def duckdb_type(t: DataType) -> str:
    """The DuckDB SQL type for a stored type."""
    if t.kind in _DUCKDB:
        return _DUCKDB[t.kind]
    if t.kind == "decimal":
        return f"DECIMAL({t.precision},{t.scale})"
    if t.kind == "timestamp":
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if t.kind == "list" and t.item:
        return f"{duckdb_type(t.item)}[]"
    if t.kind == "map" and t.key and t.item:
        return f"MAP({duckdb_type(t.key)}, {duckdb_type(t.item)})"
    if t.kind == "struct" and t.fields is not None:
        inner = ", ".join(f"{quote_ident(f.name)} {duckdb_type(f.type)}" for f in t.fields)
        return f"STRUCT({inner})"
    raise ValueError(f"unknown stored type {t!r}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """``value`` as a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def normalize_type(t: pa.DataType) -> pa.DataType:
    """The canonical representation of an Arrow type (same values, one layout)."""
    if pa.types.is_dictionary(t):
        return normalize_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return pa.binary()
    if pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_date64(t):
        return pa.date32()
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(normalize_type(t.value_type))
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(normalize_type(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(normalize_type(t.key_type), normalize_type(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, normalize_type(f.type)) for f in t])
    return t


def normalize_array(arr: pa.ChunkedArray, column: str) -> pa.ChunkedArray:
    """Cast to the canonical layout; fails (TypeMismatch) only if values would change,
    e.g. nanosecond timestamps with sub-microsecond digits."""
    target = normalize_type(arr.type)
    if target == arr.type:
        return arr
    try:
        return pc.cast(arr, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeMismatch(
            f"column {column!r}: cannot store {arr.type} values without changing them ({exc})",
            column=column,
            actual=str(arr.type),
        ) from exc


def _mismatch(column: str, want: DataType, have: DataType, why: str = "") -> TypeMismatch:
    detail = f" ({why})" if why else ""
    return TypeMismatch(
        f"column {column!r} has type {type_name(want)} but the data has {type_name(have)}{detail}",
        column=column,
        expected=type_name(want),
        actual=type_name(have),
    )


def _allowed(have: DataType, want: DataType, text: bool) -> bool:
    if have.kind == "null":
        return True
    if have.kind in _INT_RANK:
        if want.kind in _INT_RANK:
            return text or _INT_RANK[want.kind] >= _INT_RANK[have.kind]
        if text and (want.kind in _UINT_RANK or want.kind in ("float32", "float64", "decimal")):
            return True
    if have.kind in _UINT_RANK:
        if want.kind in _UINT_RANK:
            return text or _UINT_RANK[want.kind] >= _UINT_RANK[have.kind]
        if want.kind in _INT_RANK:
            return text or _INT_RANK[want.kind] > _UINT_RANK[have.kind]
    if have.kind == "float32" and want.kind == "float64":
        return True
    return text and have.kind == "string" and want.kind in _TEXT_PARSEABLE


def conform(arr: pa.ChunkedArray, want: DataType, column: str, *, text: bool) -> pa.ChunkedArray:
    """Make a normalized column fit the table's type ``want``, losslessly, or raise."""
    have = from_arrow(arr.type, column)
    if have == want:
        return arr
    if not _allowed(have, want, text):
        raise _mismatch(column, want, have)
    try:
        if have.kind == "string" and want.kind == "timestamp":
            return _parse_timestamps(arr, want)
        return pc.cast(arr, to_arrow(want), safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise _mismatch(column, want, have, f"a value does not convert exactly: {exc}") from exc


def _parse_timestamps(arr: pa.ChunkedArray, want: DataType) -> pa.ChunkedArray:
    # pc.cast only parses zone-less strings into zone-less timestamps, so parse the
    # instants (with an offset or Z) through strptime-free ISO parsing of DuckDB-like
    # inputs: try the naive form first, then the offset form.
    target = to_arrow(want)
    try:
        return pc.cast(arr, target, safe=True)
    except pa.ArrowInvalid:
        parsed = pc.cast(arr, pa.timestamp("us", tz="UTC"), safe=True)
        return pc.cast(parsed, target, safe=True) if want.tz is None else parsed


class StatsAccumulator:
    """Per-column null count and min/max over the batches of one file (JSON-ready values).

    min/max stay only while every non-null value was comparable and within bounds: a
    string max longer than 64 characters cannot be truncated into an upper bound, so it
    makes the column's max unknown for the whole file.
    """

    _NO_MINMAX = ("null", "list", "map", "struct", "binary", "bool")

    def __init__(self, t: DataType) -> None:
        self.type = t
        self.nulls = 0
        self.min: Any = None
        self.max: Any = None
        self.known = t.kind not in self._NO_MINMAX

    def add(self, arr: pa.ChunkedArray | pa.Array) -> None:
        self.nulls += arr.null_count
        if not self.known or arr.null_count == len(arr):
            return
        mm = pc.min_max(arr)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo is None or hi is None or (isinstance(lo, float) and lo != lo):
            self.known = False
            return
        if isinstance(lo, str) and len(lo) > 64:
            lo = lo[:64]  # a prefix is still a lower bound
        if isinstance(hi, str) and len(hi) > 64:
            self.known = False
            return
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def result(self) -> ColumnStats:
        if not self.known:
            return ColumnStats(null_count=self.nulls)
        return ColumnStats(
            null_count=self.nulls, min=_json_value(self.min), max=_json_value(self.max)
        )


def _json_value(v: Any) -> Any:
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    return v
