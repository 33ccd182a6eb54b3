"""A table version as DuckDB SQL: its Parquet files and inlined batches, one schema.

Shared by the query engine (views a user's SQL reads) and the write side (upsert,
delete and compaction read the files they rewrite through the same code, so a row
looks the same to both).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import duckdb
import pyarrow as pa

from events.model import DataFile, DeletionVector, Field
from projections.arrow import arrow_schema, duckdb_type, quote_ident, sql_literal, to_arrow

_names = itertools.count()


def inline_table(data_file: DataFile) -> pa.Table:
    """The rows of an inlined batch (an Arrow IPC stream in the event)."""
    assert data_file.inline is not None
    return pa.ipc.open_stream(pa.py_buffer(data_file.inline)).read_all()


def inline_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def conform_to(table: pa.Table, columns: Sequence[Field]) -> pa.Table:
    """``table`` (written under an older schema) in the table's current schema: columns
    it predates are typed nulls, columns that were all-null when it was written take
    their type now. Types never change otherwise, so nothing else is cast."""
    arrays = []
    for field in columns:
        target = to_arrow(field.type)
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, target))
            continue
        column = table.column(field.name)
        if column.type != target:
            column = (
                pa.nulls(table.num_rows, target)
                if column.null_count == len(column)
                else column.cast(target)
            )
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=arrow_schema(tuple(columns)))


def _register(con: duckdb.DuckDBPyConnection, table: pa.Table) -> str:
    name = f"__ll_inline_{next(_names)}"
    con.register(name, table)
    return quote_ident(name)


def _casts(columns: Sequence[Field], present: set[str] | None) -> list[str]:
    select = []
    for field in columns:
        col = quote_ident(field.name)
        if field.type.kind == "null":
            absent = present is not None and field.name not in present
            select.append(f"NULL AS {col}" if absent else col)
        elif present is not None and field.name not in present:
            select.append(f"CAST(NULL AS {duckdb_type(field.type)}) AS {col}")
        else:
            # Files written before a column got its type hold NULL-typed data; the cast
            # makes every reader see exactly the declared schema.
            select.append(f"CAST({col} AS {duckdb_type(field.type)}) AS {col}")
    return select


def cast_list(columns: Sequence[Field]) -> str:
    """The select list of rows already in the table's schema (an Arrow table conformed
    to it), with the casts a scan of files applies: for expressions that must see both
    alike (a row hash)."""
    return ", ".join(_casts(columns, None))


def positions_array(deleted: DeletionVector) -> pa.Array:
    """A deletion vector's positions as an Arrow int64 array (no copy of the bytes)."""
    raw = pa.Array.from_buffers(pa.uint32(), deleted.count, [None, pa.py_buffer(deleted.positions)])
    return raw.cast(pa.int64())


def live_mask(deleted: DeletionVector, num_rows: int) -> pa.Array:
    """A boolean mask of a file's ``num_rows`` rows: true for each row not deleted."""
    mask = bytearray(b"\x01") * num_rows
    for position in deleted.rows():
        mask[position] = 0
    return pa.Array.from_buffers(pa.uint8(), num_rows, [None, pa.py_buffer(mask)]).cast(pa.bool_())


def deletion_table(files: Sequence[DataFile]) -> pa.Table:
    """(index in ``files``, position) of every deleted row of ``files``."""
    indexes, positions = [], []
    for i, f in enumerate(files):
        if f.deleted is not None:
            indexes.append(pa.repeat(pa.scalar(i, pa.uint64()), f.deleted.count))
            positions.append(positions_array(f.deleted))
    return pa.table(
        {
            "__ll_i": pa.concat_arrays(indexes) if indexes else pa.array([], pa.uint64()),
            "__ll_pos": pa.concat_arrays(positions) if positions else pa.array([], pa.int64()),
        }
    )


def _stored_rows(
    con: duckdb.DuckDBPyConnection,
    columns: Sequence[Field],
    files: Sequence[DataFile],
    resolve_path: Callable[[str], str],
    *,
    deleted: bool = False,
) -> tuple[str, str, str]:
    """(select list, FROM clause, file index expression) of one scan of the Parquet
    ``files``, less the rows their deletion vectors delete (an anti-join on each row's
    file index and position; ``deleted`` keeps them). The index expression is a row's
    file's index in ``files``; ``__ll_rows.file_row_number`` its position in the file.

    DuckDB's virtual ``file_index`` column names the file; a table with a column of
    that name (which would shadow it) has its files named by path instead."""
    select, paths, union = _scan(columns, files, resolve_path)
    if not any(f.name.lower() == "file_index" for f in columns):
        source = f"read_parquet([{paths}]{union}) AS __ll_rows"
        index = "__ll_rows.file_index"
    else:
        names = _register(
            con,
            pa.table({
                "__ll_file": [resolve_path(f.path) for f in files],
                "__ll_i": pa.array(range(len(files)), pa.uint64()),
            }),
        )  # fmt: skip
        source = (
            f"read_parquet([{paths}], filename = '__ll_file'{union}) AS __ll_rows "
            f"JOIN {names} AS __ll_names ON __ll_rows.__ll_file = __ll_names.__ll_file"
        )
        index = "__ll_names.__ll_i"
    if not deleted and any(f.deleted is not None for f in files):
        gone = _register(con, deletion_table(files))
        source += (
            f" ANTI JOIN {gone} AS __ll_gone ON {index} = __ll_gone.__ll_i "
            f"AND __ll_rows.file_row_number = __ll_gone.__ll_pos"
        )
    return select, source, index


def _same_layout(files: Sequence[DataFile], present: set[str]) -> bool:
    """Whether DuckDB can read ``files`` without ``union_by_name`` (which reads every
    file's footer whenever a query is bound: a third of a point lookup over 100 files).
    It can when every file has the same columns (DuckDB then matches them by name) of
    the same types. A column's type only ever changes from null to a real type (an
    all-null column getting one), so a file where a column is all nulls, which may be
    of the null type, keeps ``union_by_name``."""
    for f in files:
        if f.columns.keys() != present:
            return False
        if any(stats.null_count >= f.rows for stats in f.columns.values()):
            return False
    return True


def _scan(
    columns: Sequence[Field], files: Sequence[DataFile], resolve_path: Callable[[str], str]
) -> tuple[str, str, str]:
    """(select list, path list, read_parquet options) of one scan of Parquet files."""
    present: set[str] = set()
    for f in files:
        present.update(f.columns)
    paths = ", ".join(sql_literal(resolve_path(f.path)) for f in files)
    union = "" if _same_layout(files, present) else ", union_by_name = true"
    return ", ".join(_casts(columns, present)), paths, union


def version_sql(
    con: duckdb.DuckDBPyConnection,
    columns: Sequence[Field],
    files: Sequence[DataFile],
    resolve_path: Callable[[str], str],
) -> str:
    """A SELECT over every row of ``files``, in exactly the schema ``columns``.

    Inlined batches are registered on ``con`` as one Arrow table. Files with deleted
    rows are read in one scan of their own with each row's file name and position, less
    their deletion vectors (registered as one Arrow table, anti-joined): the other files
    pay nothing for them."""
    parquet = [f for f in files if not f.is_inline and f.deleted is None]
    deleted = [f for f in files if not f.is_inline and f.deleted is not None]
    inline = [f for f in files if f.is_inline]
    parts = []
    if parquet:
        select, paths, union = _scan(columns, parquet, resolve_path)
        parts.append(f"SELECT {select} FROM read_parquet([{paths}]{union})")
    if deleted:
        select, source, _ = _stored_rows(con, columns, deleted, resolve_path)
        parts.append(f"SELECT {select} FROM {source}")
    if inline:
        merged = pa.concat_tables([conform_to(inline_table(f), columns) for f in inline])
        parts.append(f"SELECT * FROM {_register(con, merged)}")
    if not parts:
        parts.append(f"SELECT * FROM {_register(con, arrow_schema(tuple(columns)).empty_table())}")
    return " UNION ALL ".join(parts)


def ordered_files_sql(
    con: duckdb.DuckDBPyConnection,
    columns: Sequence[Field],
    files: Sequence[DataFile],
    resolve_path: Callable[[str], str],
    only: Sequence[int] | None = None,
    *,
    deleted: bool = False,
) -> str:
    """Like ``version_sql``, each row tagged with its file's index in ``files``
    (``__f``) and its row number in that file (``__r``): for finding the rows a change
    removes and for rewriting files in the order of their rows. ``only`` restricts it
    to the files of those indexes; ``deleted`` keeps the rows deleted by deletion
    vectors (every physical row). One scan reads every Parquet file (DuckDB reads only
    the columns a query over it uses, and prunes by its filters)."""
    chosen = [(i, files[i]) for i in (range(len(files)) if only is None else only)]
    parquet = [(i, f) for i, f in chosen if not f.is_inline]
    inline = [(i, f) for i, f in chosen if f.is_inline]
    parts = []
    if parquet:
        stored = [f for _, f in parquet]
        select, source, index = _stored_rows(con, columns, stored, resolve_path, deleted=deleted)
        if [i for i, _ in parquet] != list(range(len(parquet))):
            index = f"[{', '.join(str(i) for i, _ in parquet)}][CAST({index} AS BIGINT) + 1]"
        parts.append(
            f"SELECT {select}, __ll_rows.file_row_number AS __r, CAST({index} AS BIGINT) AS __f "
            f"FROM {source}"
        )
    if inline:
        tagged = []
        for i, f in inline:
            rows = conform_to(inline_table(f), columns)
            rows = rows.append_column("__r", pa.array(range(rows.num_rows), pa.int64()))
            tagged.append(
                rows.append_column("__f", pa.repeat(pa.scalar(i, pa.int64()), rows.num_rows))
            )
        parts.append(f"SELECT * FROM {_register(con, pa.concat_tables(tagged))}")
    if not parts:
        empty = arrow_schema(tuple(columns)).empty_table()
        empty = empty.append_column("__r", pa.array([], pa.int64()))
        empty = empty.append_column("__f", pa.array([], pa.int64()))
        parts.append(f"SELECT * FROM {_register(con, empty)}")
    return " UNION ALL ".join(f"({p})" for p in parts)
