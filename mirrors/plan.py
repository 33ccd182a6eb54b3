"""What a mirror publishes for one table version: its schema and its files.

The mirror references the canonical Parquet files in place. Three kinds of batch cannot
be referenced as they are, and get a *mirror-owned copy* (only that batch, once):

- an inlined batch (its rows live in the event, there is no file);
- a file with an unsigned integer column (neither Delta nor Iceberg has unsigned types;
  a reader would take the raw bits as signed) or, for Delta, a ``time`` column (Delta
  has no time type);
- a file written while a column was still all-null and untyped (its Parquet column has
  the null type, which a reader cannot read as the column's later type);
- a file with deleted rows (a deletion vector): the copy holds only its live rows, so
  every Delta and Iceberg reader reads the table exactly without supporting deletion
  vectors or position deletes (see docs/design.md, "Deletion vectors and mirrors").

A copy lives at ``<org>/<super>/<table>/mirror/<format>/<name>.parquet``, where
``name`` comes from the batch's own name (and its deletion vector's version), so each
batch is copied at most once per format and state; it holds the batch's live rows in
the mirror's types. A column that was untyped when the batch was written is typed nulls
if the column has a type by the time of the copy, and left out otherwise (a reader
returns null for a column a file lacks). Copies are mirror files: ``ledgerlake gc``
deletes one once its batch (in that state) is gone from every retained version.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa

from events.model import DataFile, DataType, Field
from projections.arrow import to_arrow

# Unsigned integers widen to the next signed type (as Spark reads Parquet's unsigned).
_UNSIGNED = {
    "uint8": pa.int16(),
    "uint16": pa.int32(),
    "uint32": pa.int64(),
    "uint64": pa.decimal128(20, 0),
}


def mirror_type(t: DataType, fmt: str) -> pa.DataType | None:
    """The Arrow type a column has in the mirror; None for an untyped all-null column,
    which the mirror leaves out until a write gives it a type."""
    if t.kind == "null":
        return None
    if t.kind in _UNSIGNED:
        return _UNSIGNED[t.kind]
    if t.kind == "time" and fmt == "delta":
        return pa.string()  # ISO text, e.g. 13:45:00.250000
    if t.kind == "list" and t.item is not None:
        item = mirror_type(t.item, fmt)
        return pa.list_(item if item is not None else pa.string())
    if t.kind == "map" and t.key is not None and t.item is not None:
        key, item = mirror_type(t.key, fmt), mirror_type(t.item, fmt)
        return pa.map_(key or pa.string(), item or pa.string())
    if t.kind == "struct" and t.fields is not None:
        fields = [(f.name, mirror_type(f.type, fmt)) for f in t.fields]
        return pa.struct([pa.field(n, ft) for n, ft in fields if ft is not None])
    return to_arrow(t)


def mirror_schema(columns: tuple[Field, ...], fmt: str) -> pa.Schema:
    """The mirror's schema: every typed column, nullable, in the table's order."""
    fields = []
    for column in columns:
        t = mirror_type(column.type, fmt)
        if t is not None:
            fields.append(pa.field(column.name, t, nullable=True))
    return pa.schema(fields)


def needs_copy(schema: pa.Schema, fmt: str) -> bool:
    """Whether a Parquet file with this (Arrow) schema must be copied for ``fmt``."""
    return any(_needs_copy(f.type, fmt) for f in schema)


def _needs_copy(t: pa.DataType, fmt: str) -> bool:
    if pa.types.is_null(t) or pa.types.is_unsigned_integer(t):
        return True
    if fmt == "delta" and pa.types.is_time(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _needs_copy(t.value_type, fmt)
    if pa.types.is_map(t):
        return _needs_copy(t.key_type, fmt) or _needs_copy(t.item_type, fmt)
    if pa.types.is_struct(t):
        return any(_needs_copy(f.type, fmt) for f in t)
    return False


def to_mirror(table: pa.Table, fmt: str, schema: pa.Schema) -> pa.Table | None:
    """A batch's rows in the mirror's types (unsigned → wider signed, Delta's time →
    text). A column that was untyped (all null) when the batch was written takes its
    type in ``schema`` (the mirror's now) as typed nulls, or is left out if it still has
    none. A batch with no column left keeps its rows as nulls of the typed columns;
    None only when the table has no typed column at all (then there is no mirror)."""
    arrays, fields = [], []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_null(column.type):
            if name not in schema.names:
                continue
            target: pa.DataType | None = schema.field(name).type
            column = pa.nulls(len(column), target)
        else:
            target = _target_type(column.type, fmt)
        if target is None:
            continue
        if column.type != target:
            column = column.cast(target)
        arrays.append(column)
        fields.append(pa.field(name, target))
    if not arrays:
        if not schema:
            return None
        # Only untyped columns (a sparse record): its rows, with the typed columns null.
        arrays = [pa.nulls(table.num_rows, f.type) for f in schema]
        fields = [pa.field(f.name, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _target_type(t: pa.DataType, fmt: str) -> pa.DataType | None:
    if pa.types.is_null(t):
        return None
    if pa.types.is_unsigned_integer(t):
        return _UNSIGNED[f"uint{t.bit_width}"]
    if fmt == "delta" and pa.types.is_time(t):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_target_type(t.value_type, fmt) or pa.string())
    if pa.types.is_map(t):
        key = _target_type(t.key_type, fmt) or pa.string()
        return pa.map_(key, _target_type(t.item_type, fmt) or pa.string())
    if pa.types.is_struct(t):
        fields = [(f.name, _target_type(f.type, fmt)) for f in t]
        return pa.struct([pa.field(n, ft) for n, ft in fields if ft is not None])
    return t


def copy_key(table_prefix: str, source: DataFile, fmt: str) -> str:
    """Where the mirror-owned copy of ``source`` lives."""
    return f"{table_prefix}/mirror/{fmt}/{copy_name(source.identity)}.parquet"


def copy_name(identity: str) -> str:
    """The name of the copy of a batch by its ``DataFile.identity``: the batch's own
    name, and ``-d<version>`` for a file with deleted rows (each state of its deletion
    vector is another copy)."""
    path, _, deleted = identity.partition("#")
    stem = posixpath.basename(path).removesuffix(".parquet")
    return f"{stem}-d{deleted}" if deleted else stem


def table_prefix(org: str, super_: str, table: str) -> str:
    return f"{org}/{super_}/{table}"


@dataclass(frozen=True)
class MirrorFile:
    """One file of the mirror: ``key`` (relative to the storage root) and where it came
    from. ``copied`` is True for a mirror-owned copy."""

    key: str
    source: str
    rows: int
    size_bytes: int
    copied: bool
