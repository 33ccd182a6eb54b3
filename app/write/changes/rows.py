"""The row work of a change, on an internal DuckDB connection in a worker thread (or
pure): key checks, candidate files by their statistics, the merge of an upsert, the
rows a delete keeps, and the rows of files in scan order."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from app.write.bodies import Plan, Source
from app.write.changes.indexed import index_rows, indexed_decide
from app.write.changes.keyindex import TableIndex, Written
from events.errors import InvalidInput, TypeMismatch
from events.model import DataFile, DataType, Field, FileDeletes
from events.positions import merge_positions, pack_positions
from projections.arrow import (
    arrow_schema,
    conform,
    normalize_array,
    quote_ident,
    to_arrow,
    type_name,
)
from projections.query.views import conform_to, ordered_files_sql

KEY_KINDS = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "decimal", "string", "binary", "date", "time", "timestamp",
})  # fmt: skip
_ORDERABLE = KEY_KINDS - {"bool", "binary"}


def check_key_list(key: Sequence[str]) -> list[str]:
    names = [k.strip() for k in key if k.strip()]
    if not names:
        raise InvalidInput("an upsert needs key=<column>[,<column>...]", code="invalid_key")
    if len({n.lower() for n in names}) != len(names):
        raise InvalidInput("a key column is listed twice", code="invalid_key")
    return names


def _check_key_column(name: str, t: DataType, what: str = "key") -> None:
    kinds = KEY_KINDS if what == "key" else _ORDERABLE
    if t.kind not in kinds:
        raise InvalidInput(
            f"column {name!r} has type {type_name(t)}, which cannot be a {what} column",
            code="invalid_key",
        )


def check_upsert_columns(
    plan: Plan, source: Source, key: list[str], newer_than: str | None
) -> None:
    types = {f.name: f.type for f in plan.columns}
    incoming = {f.name for f in source.fields}
    for name in key:
        if name not in types:
            raise InvalidInput(f"the key column {name!r} does not exist", code="invalid_key")
        if name not in incoming:
            raise InvalidInput(f"the body has no key column {name!r}", code="missing_key_column")
        _check_key_column(name, types[name])
    if newer_than is not None:
        if newer_than not in types or newer_than not in incoming:
            raise InvalidInput(
                f"newer_than names column {newer_than!r}, which the body does not have",
                code="invalid_newer_than",
            )
        _check_key_column(newer_than, types[newer_than], "newer_than")


def key_table(keys: dict[str, list[Any]], columns: tuple[Field, ...]) -> pa.Table:
    """The JSON key lists of a delete, typed as the table's key columns."""
    if not isinstance(keys, dict) or not keys:
        raise InvalidInput("'keys' must map column names to lists of values", code="invalid_key")
    types = {f.name: f.type for f in columns}
    lengths = {len(v) if isinstance(v, list) else -1 for v in keys.values()}
    if -1 in lengths or len(lengths) != 1 or 0 in lengths:
        raise InvalidInput(
            "every 'keys' entry must be a non-empty list, all of the same length",
            code="invalid_key",
        )
    arrays = {}
    for name, values in keys.items():
        if name not in types:
            raise InvalidInput(f"the table has no column {name!r}", code="invalid_key")
        _check_key_column(name, types[name])
        if any(v is None for v in values):
            raise InvalidInput(f"key column {name!r} lists a null", code="null_key")
        try:
            raw = pa.chunked_array([pa.array(values)])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise TypeMismatch(
                f"the values of key column {name!r} cannot share one type ({exc})",
                code="mixed_types",
                column=name,
            ) from exc
        arrays[name] = conform(normalize_array(raw, name), types[name], name, text=True)
    return pa.table(arrays)


def _comparable(t: DataType, value: Any) -> Any:
    """A stats value (JSON) or a Python value as something that orders correctly."""
    if isinstance(value, str) and t.kind == "decimal":
        return Decimal(value)
    if isinstance(value, str) and t.kind == "timestamp":
        return datetime.fromisoformat(value)
    if isinstance(value, str) and t.kind == "date":
        return date.fromisoformat(value)
    if isinstance(value, str) and t.kind == "time":
        return dtime.fromisoformat(value)
    return value


def candidates(
    files: Sequence[DataFile],
    columns: tuple[Field, ...],
    incoming: pa.Table,
    key: Sequence[str],
) -> list[DataFile]:
    """The files that may hold one of the incoming keys, by their min/max statistics:
    a file is skipped when, for some key column, no incoming value falls in its range
    (or the column is all null in it: a null key never matches)."""
    return [files[i] for i in candidate_indexes(files, columns, incoming, key)]


def candidate_indexes(
    files: Sequence[DataFile],
    columns: tuple[Field, ...],
    incoming: pa.Table,
    key: Sequence[str],
) -> list[int]:
    """``candidates`` as indexes into ``files``."""
    types = {f.name: f.type for f in columns}
    values: dict[str, list[Any]] = {}
    for name in key:
        if types[name].kind in _ORDERABLE:
            raw = incoming.column(name).to_pylist()
            values[name] = sorted(_comparable(types[name], v) for v in raw if v is not None)
    return [
        i
        for i, f in enumerate(files)
        if not any(_prunes(f, name, types[name], vals) for name, vals in values.items())
    ]


def _prunes(f: DataFile, name: str, t: DataType, sorted_values: list[Any]) -> bool:
    stats = f.columns.get(name)
    if stats is None or stats.null_count >= f.rows:
        return True  # the column is absent or all null in this file
    if stats.min is None or stats.max is None:
        return False
    lo, hi = _comparable(t, stats.min), _comparable(t, stats.max)
    i = bisect.bisect_left(sorted_values, lo)
    return i == len(sorted_values) or sorted_values[i] > hi


def _col_list(columns: Sequence[Field], prefix: str = "") -> str:
    return ", ".join(prefix + quote_ident(f.name) for f in columns)


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, columns: Sequence[Field]) -> pa.Table:
    """A result as an Arrow table of exactly the table's column types."""
    table = con.execute(sql).to_arrow_table()
    arrays = []
    for i, f in enumerate(columns):
        column = table.column(i)
        target = to_arrow(f.type)
        if column.type != target:
            column = (
                pa.chunked_array([pa.nulls(len(column), target)], target)
                if f.type.kind == "null" or column.null_count == len(column)
                else column.cast(target)
            )
        arrays.append(column)
    return pa.Table.from_arrays(arrays, names=[f.name for f in columns])


def _decide(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    scan: str,
    on: str,
    newer_than: str | None,
) -> tuple[list[int], list[str], dict[int, list[int]]]:
    """Decide each incoming row of ``__i`` against the stored rows of its key (those of
    ``scan``), in one statement: (``__o`` of each, its decision: insert, keep or
    update, and the positions by file of the stored rows the updates replace)."""
    same = " AND ".join(
        f"__s.{quote_ident(f.name)} IS NOT DISTINCT FROM __i.{quote_ident(f.name)}" for f in columns
    )
    if newer_than:
        incoming_nt = f"__i.{quote_ident(newer_than)}"
        newest = f"max(__s.{quote_ident(newer_than)})"
        not_newer = (
            f"({incoming_nt} IS NULL OR ({newest} IS NOT NULL AND {incoming_nt} <= {newest}))"
        )
        group = f"__i.__o, {incoming_nt}"
    else:
        not_newer, group = "false", "__i.__o"
    decided = con.execute(
        f"WITH __s AS (SELECT * FROM ({scan}) AS __s SEMI JOIN __i ON {on}) "
        f"SELECT __i.__o, CASE WHEN count(__s.__f) = 0 THEN 'insert' "
        f"WHEN {not_newer} OR (count(__s.__f) = 1 AND bool_and({same})) THEN 'keep' "
        f"ELSE 'update' END AS what, list(__s.__f) FILTER (__s.__f IS NOT NULL), "
        f"list(__s.__r) FILTER (__s.__f IS NOT NULL) "
        f"FROM __i LEFT JOIN __s ON {on} GROUP BY {group}"
    ).fetchall()
    replaced: dict[int, list[int]] = {}
    for _, what, in_files, positions in decided:
        if what == "update":
            for f, r in zip(in_files, positions, strict=True):
                replaced.setdefault(f, []).append(r)
    for positions in replaced.values():
        positions.sort()
    return [row[0] for row in decided], [row[1] for row in decided], replaced


def _unique_keys(rows: pa.Table, key: list[str], columns: tuple[Field, ...]) -> bool:
    """Whether no two incoming rows share a key (as DuckDB groups them: nulls alike).
    Float keys always go to DuckDB, which groups NaNs and signed zeros its own way."""
    kinds = {f.name: f.type.kind for f in columns}
    if any(kinds[k] in ("float32", "float64") for k in key):
        return False
    return bool(rows.select(key).group_by(key).aggregate([]).num_rows == rows.num_rows)


def merge_rows(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    incoming: pa.Table,
    key: list[str],
    newer_than: str | None,
    resolve_path: Callable[[str], str],
    in_place: Callable[[DataFile, int], bool],
    index: TableIndex | None = None,
) -> tuple[pa.Table, dict[str, int], Gone, Written | None]:
    """The upsert on the table's ``files``: (rows to write, counts, the stored rows it
    replaces, and when the ``index`` decided and no file is rewritten, the keys and row
    hashes of the rows to write, for ``index.adopt``). Rows written: the kept rows of
    each file rewritten, in order, then the applied incoming rows, in order.

    With a key ``index`` the stored rows of the incoming keys come from it. Otherwise
    (or when an incoming row may equal its stored one, which only the rows can tell)
    one scan of the candidate files finds them (a semi join: DuckDB hashes the incoming
    keys and streams the files past them). Only the files it rewrites are read in
    full."""
    rows = conform_to(incoming, columns)
    rows = rows.append_column("__o", pa.array(range(rows.num_rows), pa.int64()))
    if _unique_keys(rows, key, columns):
        con.register("__i", rows)
    else:  # the last row of each key wins (the newest, with newer_than)
        con.register("__incoming", rows)
        keys = ", ".join(quote_ident(k) for k in key)
        last = (f"{quote_ident(newer_than)} DESC NULLS LAST, " if newer_than else "") + "__o DESC"
        con.execute(
            f"CREATE TEMP TABLE __i AS SELECT * FROM __incoming "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {last}) = 1"
        )
    found: tuple[list[int], list[str], dict[int, list[int]]] | None = None
    described = None
    if index is not None and newer_than is None:
        with index.lock:
            indexed = indexed_decide(con, columns, files, key[0], index, resolve_path)
        if indexed is not None:
            found, described = indexed[:3], indexed[3]
    if found is None:
        on = " AND ".join(f"__s.{quote_ident(k)} = __i.{quote_ident(k)}" for k in key)
        only = candidate_indexes(files, columns, incoming, key)
        scan = ordered_files_sql(con, columns, files, resolve_path, only=only)
        found = _decide(con, columns, scan, on, newer_than)
    decided, whats, replaced = found
    # Stored rows replaced: every stored row whose key an applied update carries.
    removed_rows, gone = _split(files, replaced, in_place)
    applied = sorted(o for o, what in zip(decided, whats, strict=True) if what != "keep")
    out = rows.take(pa.array(applied, pa.int64())).drop_columns(["__o"])
    written = None
    if gone.rewrite:
        out = pa.concat_tables([_kept(con, columns, files, gone, replaced, resolve_path), out])
    elif described is not None:
        written = [described[o][0] for o in applied], [described[o][1] for o in applied]
    counts = {
        "inserted": whats.count("insert"),
        "updated": whats.count("update"),
        "unchanged": whats.count("keep"),
        "rows_removed": removed_rows,
    }
    return out, counts, gone, written


def _matches(con: duckdb.DuckDBPyConnection, condition: str, key_rows: pa.Table | None) -> str:
    """A delete's test of a row of ``__s``: ``condition`` over it and, with ``key_rows``
    (registered as ``__k``), some key row; NULL counts as no match."""
    if key_rows is None:
        return f"coalesce(({condition}), false)"
    con.register("__k", key_rows)
    return f"EXISTS (SELECT 1 FROM __k WHERE {condition})"


def delete_rows(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    condition: str,
    key_rows: pa.Table | None,
    resolve_path: Callable[[str], str],
    in_place: Callable[[DataFile, int], bool],
    index: TableIndex | None = None,
) -> tuple[pa.Table, int, Gone]:
    """(kept rows of the files rewritten, rows removed, the rows removed by file).
    With ``key_rows`` of one key column and its ``index``, the rows to remove come from
    the index; otherwise one scan finds them (DuckDB reads only the columns
    ``condition`` names). Only the files it rewrites are read in full."""
    if index is not None and key_rows is not None:
        with index.lock:
            (name,) = key_rows.column_names
            index.update(files, lambda new: index_rows(con, columns, new, name, resolve_path))
            keys = pc.cast(key_rows.column(name), pa.int64()).to_pylist()
            hits = index.lookup(sorted(set(keys)), files)
        by_file: dict[int, list[int]] = {}
        for stored in hits.values():
            for at, position, _ in stored:
                by_file.setdefault(at, []).append(position)
        for positions in by_file.values():
            positions.sort()
    else:
        scan = ordered_files_sql(con, columns, files, resolve_path)
        match = _matches(con, condition, key_rows)
        by_file = {
            int(f): [int(r) for r in positions]
            for f, positions in con.execute(
                f"SELECT __s.__f, list(__s.__r ORDER BY __s.__r) FROM ({scan}) AS __s "
                f"WHERE {match} GROUP BY __s.__f"
            ).fetchall()
        }
    removed_rows, gone = _split(files, by_file, in_place)
    if not gone.rewrite:
        return conform_to(arrow_schema(columns).empty_table(), columns), removed_rows, gone
    return _kept(con, columns, files, gone, by_file, resolve_path), removed_rows, gone


@dataclass
class Gone:
    """The stored rows a change removes, by file (indexes into its candidate files):
    files it rewrites (their kept rows go into its output), and positions it deletes
    in place (merge-on-read: they join the file's deletion vector)."""

    rewrite: list[int] = field(default_factory=list)
    deletes: dict[int, list[int]] = field(default_factory=dict)
    packed: dict[int, bytes] = field(default_factory=dict)  # ``deletes``, packed

    def removal(
        self, files: Sequence[DataFile]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[FileDeletes, ...]]:
        """(paths of the files rewritten, their identities, the in-place deletes)."""
        rewritten = [files[i] for i in self.rewrite]
        deletes = tuple(
            FileDeletes(
                files[i].path, len(positions), self.packed.get(i) or pack_positions(positions)
            )
            for i, positions in sorted(self.deletes.items())
        )
        return tuple(f.path for f in rewritten), tuple(f.identity for f in rewritten), deletes


def _split(
    files: list[DataFile],
    by_file: dict[int, list[int]],
    in_place: Callable[[DataFile, int], bool],
) -> tuple[int, Gone]:
    """(rows removed, the sorted positions ``by_file`` (file index -> positions) split
    into files to rewrite and rows to delete in place, as ``in_place(file, rows
    gone)`` decides per file)."""
    gone = Gone()
    for index in sorted(by_file):
        f = files[index]
        if in_place(f, len(by_file[index])):
            gone.deletes[index] = by_file[index]
            packed = gone.packed[index] = pack_positions(by_file[index])
            if f.deleted is not None:
                # Merged here, in a worker thread, the folds of the change's event
                # (on event loops) find it done.
                merge_positions(f.deleted.positions, packed)
        else:
            gone.rewrite.append(index)
    return sum(len(p) for p in by_file.values()), gone


def _kept(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    gone: Gone,
    by_file: dict[int, list[int]],
    resolve_path: Callable[[str], str],
) -> pa.Table:
    """The rows of the files ``gone`` rewrites less those ``by_file`` removes, in file
    order, then row order."""
    removed = [(f, r) for f in gone.rewrite for r in by_file.get(f, [])]
    con.register(
        "__g",
        pa.table({
            "__f": pa.array([f for f, _ in removed], pa.int64()),
            "__r": pa.array([r for _, r in removed], pa.int64()),
        }),
    )  # fmt: skip
    scan = ordered_files_sql(con, columns, files, resolve_path, only=gone.rewrite)
    return _fetch(
        con,
        f"SELECT {_col_list(columns, '__t.')} FROM ({scan}) AS __t "
        f"ANTI JOIN __g ON __t.__f = __g.__f AND __t.__r = __g.__r ORDER BY __t.__f, __t.__r",
        columns,
    )


def any_match(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    condition: str,
    key_rows: pa.Table | None,
    resolve_path: Callable[[str], str],
) -> bool:
    """Whether a row of ``files`` matches ``condition`` (over ``__s``, and ``__k``: the
    ``key_rows``, if given): whether files another writer added hold rows a change
    had to see. DuckDB reads only the columns the condition names from Parquet."""
    if not files:
        return False
    match = _matches(con, condition, key_rows)
    scan = ordered_files_sql(con, columns, files, resolve_path)
    hit = con.execute(f"SELECT 1 FROM ({scan}) AS __s WHERE {match} LIMIT 1").fetchone()
    return hit is not None


def read_ordered(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    resolve_path: Callable[[str], str],
) -> pa.Table:
    sql = ordered_files_sql(con, columns, files, resolve_path)
    return _fetch(con, f"SELECT {_col_list(columns)} FROM ({sql}) ORDER BY __f, __r", columns)
