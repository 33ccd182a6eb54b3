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

from app.write.bodies import Plan, Source
from events.errors import InvalidInput, TypeMismatch
from events.model import DataFile, DataType, Field, FileDeletes, pack_positions
from projections.arrow import conform, normalize_array, quote_ident, to_arrow, type_name
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
    types = {f.name: f.type for f in columns}
    values: dict[str, list[Any]] = {}
    for name in key:
        if types[name].kind in _ORDERABLE:
            raw = incoming.column(name).to_pylist()
            values[name] = sorted(_comparable(types[name], v) for v in raw if v is not None)
    out = []
    for f in files:
        if any(_prunes(f, name, types[name], vals) for name, vals in values.items()):
            continue
        out.append(f)
    return out


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
    con: duckdb.DuckDBPyConnection, columns: tuple[Field, ...], on: str, newer_than: str | None
) -> tuple[int, int, int]:
    """Decide each incoming row (``__d``: insert, keep or update) against the stored rows
    of its key; the counts of each."""
    same = " AND ".join(
        f"__s.{quote_ident(f.name)} IS NOT DISTINCT FROM __i.{quote_ident(f.name)}" for f in columns
    )
    newest = f"max(__s.{quote_ident(newer_than)})" if newer_than else "NULL"
    con.execute(
        f"CREATE TEMP TABLE __m AS SELECT __i.__o, count(__s.__f) AS n, "
        f"bool_and({same}) AS same, {newest} AS newest "
        f"FROM __i LEFT JOIN __s ON {on} GROUP BY __i.__o"
    )
    if newer_than:
        incoming_nt = f"__i.{quote_ident(newer_than)}"
        not_newer = (
            f"({incoming_nt} IS NULL OR (__m.newest IS NOT NULL AND {incoming_nt} <= __m.newest))"
        )
    else:
        not_newer = "false"
    con.execute(
        f"CREATE TEMP TABLE __d AS SELECT __i.__o, CASE WHEN __m.n = 0 THEN 'insert' "
        f"WHEN {not_newer} OR (__m.n = 1 AND __m.same) THEN 'keep' ELSE 'update' END AS what "
        f"FROM __i JOIN __m USING (__o)"
    )
    counts_row = con.execute(
        "SELECT count(*) FILTER (what = 'insert'), count(*) FILTER (what = 'update'), "
        "count(*) FILTER (what = 'keep') FROM __d"
    ).fetchone()
    assert counts_row is not None
    inserted, updated, unchanged = (int(x) for x in counts_row)
    return inserted, updated, unchanged


def merge_rows(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    incoming: pa.Table,
    key: list[str],
    newer_than: str | None,
    resolve_path: Callable[[str], str],
    in_place: Callable[[DataFile, int], bool],
) -> tuple[pa.Table, dict[str, int], Gone]:
    """The upsert on candidate ``files``: (rows to write, counts, the stored rows it
    replaces). Rows written: the kept rows of each file rewritten, in order, then the
    applied incoming rows, in order."""
    rows = conform_to(incoming, columns)
    rows = rows.append_column("__o", pa.array(range(rows.num_rows), pa.int64()))
    con.register("__incoming", rows)
    keys = ", ".join(quote_ident(k) for k in key)
    order = (f"{quote_ident(newer_than)} DESC NULLS LAST, " if newer_than else "") + "__o DESC"
    con.execute(
        f"CREATE TEMP TABLE __i AS SELECT * FROM __incoming "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1"
    )
    con.execute(f"CREATE TEMP TABLE __s AS {ordered_files_sql(con, columns, files, resolve_path)}")
    on = " AND ".join(f"__s.{quote_ident(k)} = __i.{quote_ident(k)}" for k in key)
    inserted, updated, unchanged = _decide(con, columns, on, newer_than)
    # Stored rows replaced: every stored row whose key an applied update carries.
    replaced = f"EXISTS (SELECT 1 FROM __i JOIN __d USING (__o) WHERE __d.what = 'update' AND {on})"
    con.execute(f"CREATE TEMP TABLE __g AS SELECT __f, __r, {replaced} AS gone FROM __s")
    removed_rows = con.execute("SELECT count(*) FROM __g WHERE gone").fetchone()
    gone = _gone(con, files, in_place)
    con.execute("DROP TABLE __g")
    out_sql = (
        f"SELECT {_col_list(columns)} FROM ("
        f"SELECT {_col_list(columns, '__s.')}, 0 AS __part, __s.__f AS __a, __s.__r AS __b "
        f"FROM __s WHERE __s.__f IN (SELECT UNNEST($rewrite)) AND NOT {replaced} "
        f"UNION ALL SELECT {_col_list(columns, '__i.')}, 1, 0, __i.__o "
        f"FROM __i JOIN __d USING (__o) WHERE __d.what <> 'keep'"
        f") ORDER BY __part, __a, __b"
    )
    out = _fetch(con, out_sql.replace("$rewrite", f"{gone.rewrite or [-1]}"), columns)
    counts = {
        "inserted": inserted,
        "updated": updated,
        "unchanged": unchanged,
        "rows_removed": int(removed_rows[0]) if removed_rows else 0,
    }
    return out, counts, gone


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
) -> tuple[pa.Table, int, Gone]:
    """(kept rows of the files rewritten, rows removed, the rows removed by file)."""
    con.execute(f"CREATE TEMP TABLE __s AS {ordered_files_sql(con, columns, files, resolve_path)}")
    match = _matches(con, condition, key_rows)
    con.execute(f"CREATE TEMP TABLE __g AS SELECT __f, __r, {match} AS gone FROM __s")
    removed = con.execute("SELECT count(*) FROM __g WHERE gone").fetchone()
    removed_rows = int(removed[0]) if removed else 0
    gone = _gone(con, files, in_place)
    out = _fetch(
        con,
        f"SELECT {_col_list(columns, '__s.')} FROM __s JOIN __g USING (__f, __r) "
        f"WHERE __s.__f IN (SELECT UNNEST({gone.rewrite or [-1]})) AND NOT __g.gone "
        f"ORDER BY __s.__f, __s.__r",
        columns,
    )
    return out, removed_rows, gone


@dataclass
class Gone:
    """The stored rows a change removes, by file (indexes into its candidate files):
    files it rewrites (their kept rows go into its output), and positions it deletes
    in place (merge-on-read: they join the file's deletion vector)."""

    rewrite: list[int] = field(default_factory=list)
    deletes: dict[int, list[int]] = field(default_factory=dict)

    def removal(
        self, files: Sequence[DataFile]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[FileDeletes, ...]]:
        """(paths of the files rewritten, their identities, the in-place deletes)."""
        rewritten = [files[i] for i in self.rewrite]
        deletes = tuple(
            FileDeletes(files[i].path, len(positions), pack_positions(positions))
            for i, positions in sorted(self.deletes.items())
        )
        return tuple(f.path for f in rewritten), tuple(f.identity for f in rewritten), deletes


def _gone(
    con: duckdb.DuckDBPyConnection,
    files: list[DataFile],
    in_place: Callable[[DataFile, int], bool],
) -> Gone:
    """Split the rows ``__g`` marks gone into files to rewrite and rows to delete in
    place, as ``in_place(file, rows gone)`` decides per file."""
    gone = Gone()
    rows = con.execute(
        "SELECT __f, list(__r ORDER BY __r) FROM __g WHERE gone GROUP BY __f ORDER BY __f"
    ).fetchall()
    for index, positions in rows:
        if in_place(files[index], len(positions)):
            gone.deletes[int(index)] = [int(p) for p in positions]
        else:
            gone.rewrite.append(int(index))
    return gone


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
