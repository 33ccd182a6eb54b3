"""Key indexes: per process and table, where the stored rows of each key are, so that
an upsert or a delete by key finds them in O(keys x log rows) instead of reading the
key column of every candidate file.

An index holds, for every row of the files it has read (Parquet files and inlined
batches), the row's key, its file (a slot number), its position in the file and a hash
of the whole row (DuckDB's ``hash`` over the table's columns, so an upsert can tell an
unchanged row without reading it). The rows sit in one sorted run, searched by
bisection and rebuilt now and then, plus the rows of files read since, in a dict. Data
files never change, so an entry is never wrong, only stale once its file has left the
table and dead once its position is in the file's deletion vector: both are checked
against the table's current files on every lookup. Every physical row is indexed,
deleted or not, so a restore that brings a file back in an older state needs nothing.

Only single-column keys of integer types are indexed; other keys use the scan.
"""

from __future__ import annotations

import bisect
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from events.model import DataFile, Field
from events.positions import unpack_positions

INDEXED_KINDS = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"})
# Rows of files read since the last rebuild, kept in the dict before a rebuild folds
# them into the sorted run (a rebuild sorts every row: ~1 s for 10M).
RECENT_MAX = 262_144
# What a stored row of an index is: key (int64) -> [(slot, position, row hash)].
Entry = tuple[int, int, int]
# One lookup's answer: key -> [(index of the file in the files given, position, hash)].
Hits = dict[int, list[Entry]]
# The keys and row hashes of the rows a change writes, in order.
Written = tuple[list[int], list[int]]
# The columns a reader of new files returns: file index (into the files given),
# position, key as int64, row hash as uint64.
INDEX_COLUMNS = ("__f", "__r", "__k", "__h")
# The columns of a run: key, slot, position, hash.
_RUN_COLUMNS = ("__k", "__s", "__r", "__h")


def indexable(columns: Sequence[Field], key: Sequence[str]) -> bool:
    kinds = {f.name: f.type.kind for f in columns}
    return len(key) == 1 and kinds.get(key[0]) in INDEXED_KINDS


def _array(typecode: str, column: pa.ChunkedArray | pa.Array) -> array[int]:
    """The values of a null-free fixed-width Arrow column as an ``array`` (one copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = array(typecode)
    width = out.itemsize
    buffer = arr.buffers()[1]
    if buffer is not None and len(arr):
        out.frombytes(memoryview(buffer)[arr.offset * width : (arr.offset + len(arr)) * width])
    return out


def _arrow(kind: pa.DataType, values: array[int]) -> pa.Array:
    """An ``array`` as an Arrow array, without copying."""
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


class _Run:
    """Rows sorted by key, as parallel arrays."""

    __slots__ = ("hashes", "keys", "rows", "slots")

    def __init__(self, table: pa.Table) -> None:
        table = table.sort_by("__k")
        self.keys = _array("q", table.column("__k"))
        self.slots = _array("q", table.column("__s"))
        self.rows = _array("q", table.column("__r"))
        self.hashes = _array("Q", table.column("__h"))

    def __len__(self) -> int:
        return len(self.keys)

    def table(self) -> pa.Table:
        return pa.table({
            "__k": _arrow(pa.int64(), self.keys),
            "__s": _arrow(pa.int64(), self.slots),
            "__r": _arrow(pa.int64(), self.rows),
            "__h": _arrow(pa.uint64(), self.hashes),
        })  # fmt: skip


class TableIndex:
    """The key index of one table, for one key column and one schema (the row hashes
    are over its columns)."""

    def __init__(self, columns: tuple[Field, ...], key: str) -> None:
        self.columns = columns
        self.key = key
        self.lock = threading.Lock()
        self._slot_of: dict[str, int] = {}
        self._slot_rows: dict[int, int] = {}
        self._next_slot = 0
        self._run: _Run | None = None
        self._recent: dict[int, list[Entry]] = {}
        self._recent_rows = 0
        self.builds = 0  # rebuilds of the sorted run, for tests and benchmarks
        self.reads = 0  # files read, for tests and benchmarks

    @property
    def rows(self) -> int:
        return (len(self._run) if self._run else 0) + self._recent_rows

    def update(
        self, files: Sequence[DataFile], read: Callable[[Sequence[DataFile]], pa.Table]
    ) -> None:
        """Index the rows of ``files`` (the table's current files) not indexed yet;
        ``read(new)`` gives their rows (``INDEX_COLUMNS``, null keys left out)."""
        new = [f for f in files if f.path not in self._slot_of]
        fresh = None
        if new:
            rows = read(new)  # first: a file whose read failed must stay unindexed
            self.reads += len(new)
            slots = []
            for f in new:
                self._slot_of[f.path] = self._next_slot
                self._slot_rows[self._next_slot] = f.rows
                slots.append(self._next_slot)
                self._next_slot += 1
            fresh = pa.table({
                "__k": rows.column("__k").cast(pa.int64()),
                "__s": pc.take(pa.array(slots, pa.int64()), rows.column("__f")),
                "__r": rows.column("__r").cast(pa.int64()),
                "__h": rows.column("__h"),
            })  # fmt: skip
        live = {self._slot_of[f.path] for f in files}
        stale = sum(n for slot, n in self._slot_rows.items() if slot not in live)
        if fresh is not None and (self._run is None or fresh.num_rows > RECENT_MAX):
            self._rebuild(live, fresh)
        elif fresh is not None:
            self._add_recent(fresh)
        if self._recent_rows > RECENT_MAX or stale > max(self.rows // 2, RECENT_MAX):
            self._rebuild(live, None)

    def adopt(self, data_file: DataFile, rows: Written) -> None:
        """Index ``data_file``, a file a change wrote, from the keys and row hashes of
        its rows (in order), without reading it."""
        keys, hashes = rows
        if data_file.path in self._slot_of or len(keys) != data_file.rows:
            return
        slot = self._next_slot
        self._next_slot += 1
        self._slot_of[data_file.path] = slot
        self._slot_rows[slot] = data_file.rows
        for position, (k, h) in enumerate(zip(keys, hashes, strict=True)):
            self._recent.setdefault(k, []).append((slot, position, h))
        self._recent_rows += data_file.rows

    def _add_recent(self, fresh: pa.Table) -> None:
        keys, slots, rows, hashes = (fresh.column(c).to_pylist() for c in _RUN_COLUMNS)
        for k, s, r, h in zip(keys, slots, rows, hashes, strict=True):
            self._recent.setdefault(k, []).append((s, r, h))
        self._recent_rows += fresh.num_rows

    def _rebuild(self, live: set[int], fresh: pa.Table | None) -> None:
        """One sorted run of every row of the ``live`` slots."""
        parts = []
        if self._run is not None:
            parts.append(self._run.table())
        if self._recent:
            entries = [(k, *e) for k, es in self._recent.items() for e in es]
            parts.append(
                pa.table({
                    "__k": pa.array([e[0] for e in entries], pa.int64()),
                    "__s": pa.array([e[1] for e in entries], pa.int64()),
                    "__r": pa.array([e[2] for e in entries], pa.int64()),
                    "__h": pa.array([e[3] for e in entries], pa.uint64()),
                })
            )  # fmt: skip
        if fresh is not None:
            parts.append(fresh)
        table = pa.concat_tables(parts)
        table = table.filter(pc.is_in(table.column("__s"), pa.array(sorted(live), pa.int64())))
        self._run = _Run(table)
        self._recent, self._recent_rows = {}, 0
        for path, slot in list(self._slot_of.items()):
            if slot not in live:
                del self._slot_of[path]
                del self._slot_rows[slot]
        self.builds += 1

    def lookup(self, keys: Sequence[int], files: Sequence[DataFile]) -> Hits:
        """The live stored rows of each of ``keys`` among ``files`` (indexed by
        ``update``): those whose file is one of ``files`` and whose position is not in
        its deletion vector."""
        index_of = {
            self._slot_of[f.path]: i for i, f in enumerate(files) if f.path in self._slot_of
        }
        dead: dict[int, array[int]] = {}
        for i, f in enumerate(files):
            if f.deleted is not None:
                dead[i] = unpack_positions(f.deleted.positions)

        out: Hits = {}
        run = self._run
        run_keys = run.keys if run is not None else array("q")
        count = len(run_keys)
        recent = self._recent
        left = bisect.bisect_left
        for k in keys:
            found: list[Entry] = []
            i = left(run_keys, k) if count else 0
            while i < count and run_keys[i] == k:
                assert run is not None
                found.append((run.slots[i], run.rows[i], run.hashes[i]))
                i += 1
            found.extend(recent.get(k, ()))
            hits = []
            for slot, row, h in found:
                at = index_of.get(slot)
                if at is None:
                    continue  # its file has left the table
                gone = dead.get(at)
                if gone is not None:
                    j = left(gone, row)
                    if j < len(gone) and gone[j] == row:
                        continue  # deleted
                hits.append((at, row, h))
            out[k] = hits
        return out


class KeyIndexes:
    """The key indexes of a process: one per table and key column, the least recently
    used dropped while they hold more than ``max_rows`` rows in all (about 32 bytes a
    row). A table larger than ``max_rows`` has none; ``max_rows=0`` disables them."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._tables: OrderedDict[tuple[str, ...], TableIndex] = OrderedDict()

    def get(
        self, table: tuple[str, str, str], columns: tuple[Field, ...], key: str, rows: int
    ) -> TableIndex | None:
        if rows > self.max_rows:
            return None
        name = (*table, key)
        with self._lock:
            index = self._tables.get(name)
            if index is None or index.columns != columns:
                index = self._tables[name] = TableIndex(columns, key)
            self._tables.move_to_end(name)
            total = sum(i.rows for i in self._tables.values())
            while total > self.max_rows and len(self._tables) > 1:
                _, dropped = self._tables.popitem(last=False)
                total -= dropped.rows
            return index
