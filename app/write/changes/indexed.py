"""The row work of upserts and deletes by a key index (``keyindex.py``): reading new
files' keys and row hashes into it, and deciding an upsert's incoming rows by it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import duckdb
import pyarrow as pa

from app.write.changes.keyindex import TableIndex
from events.model import DataFile, Field
from projections.arrow import quote_ident
from projections.query.views import cast_list, ordered_files_sql


def _row_hash(columns: Sequence[Field]) -> str:
    return "hash(" + ", ".join(quote_ident(f.name) for f in columns) + ")"


def index_rows(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: Sequence[DataFile],
    key: str,
    resolve_path: Callable[[str], str],
) -> pa.Table:
    """Every physical row of ``files`` with a key, for a key index (``INDEX_COLUMNS``:
    file index, position, key, hash of the row in the table's schema)."""
    scan = ordered_files_sql(con, columns, files, resolve_path, deleted=True)
    k = quote_ident(key)
    return con.execute(
        f"SELECT __f, __r, CAST({k} AS BIGINT) AS __k, {_row_hash(columns)} AS __h "
        f"FROM ({scan}) WHERE {k} IS NOT NULL"
    ).to_arrow_table()


def indexed_decide(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    key: str,
    index: TableIndex,
    resolve_path: Callable[[str], str],
) -> tuple[list[int], list[str], dict[int, list[int]], dict[int, tuple[int, int]]] | None:
    """``_decide`` by the key index (and each incoming row's key and row hash, by
    ``__o``), or None if an incoming row has the hash of the one stored row of its key
    (it may be unchanged: the scan compares the rows)."""
    index.update(files, lambda new: index_rows(con, columns, new, key, resolve_path))
    incoming = con.execute(
        f"SELECT __o, CAST({quote_ident(key)} AS BIGINT), {_row_hash(columns)} "
        f"FROM (SELECT {cast_list(columns)}, __o FROM __i)"
    ).fetchall()
    hits = index.lookup(sorted({k for _, k, _ in incoming}), files)
    decided: list[int] = []
    whats: list[str] = []
    replaced: dict[int, list[int]] = {}
    for o, k, row_hash in incoming:
        stored = hits[k]
        if not stored:
            what = "insert"
        elif len(stored) == 1 and stored[0][2] == row_hash:
            return None
        else:
            what = "update"
            for at, position, _ in stored:
                replaced.setdefault(at, []).append(position)
        decided.append(o)
        whats.append(what)
    for positions in replaced.values():
        positions.sort()
    return decided, whats, replaced, {o: (k, h) for o, k, h in incoming}
