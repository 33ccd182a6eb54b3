"""The key index of upserts and deletes by key (pure logic: files are described by
their keys, read by a stand-in for the DuckDB reader)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.write.changes import keyindex
from app.write.changes.keyindex import KeyIndexes, TableIndex, indexable
from events.model import DataFile, DataType, DeletionVector, Field
from events.positions import pack_positions

COLUMNS = (Field("id", DataType("int64")), Field("v", DataType("string")))


class Store:
    """Files by path: the key of each row (None: a null key), and what was read."""

    def __init__(self) -> None:
        self.keys: dict[str, list[int | None]] = {}
        self.read: list[str] = []

    def file(self, path: str, keys: list[int | None], deleted: Sequence[int] = ()) -> DataFile:
        self.keys[path] = keys
        vector = None
        if deleted:
            vector = DeletionVector(1, len(set(deleted)), pack_positions(deleted))
        return DataFile(path=path, rows=len(keys), size_bytes=1, deleted=vector)

    def reader(self, files: Sequence[DataFile]) -> pa.Table:
        out: dict[str, list[int]] = {c: [] for c in keyindex.INDEX_COLUMNS}
        for i, f in enumerate(files):
            self.read.append(f.path)
            for row, k in enumerate(self.keys[f.path]):
                if k is not None:
                    out["__f"].append(i)
                    out["__r"].append(row)
                    out["__k"].append(k)
                    out["__h"].append(hash_of(f.path, row))
        return pa.table({
            "__f": pa.array(out["__f"], pa.int64()),
            "__r": pa.array(out["__r"], pa.int64()),
            "__k": pa.array(out["__k"], pa.int64()),
            "__h": pa.array(out["__h"], pa.uint64()),
        })  # fmt: skip


def hash_of(path: str, row: int) -> int:
    return (sum(map(ord, path)) * 1_000_003 + row) % 2**64


def expected(files: Sequence[DataFile], store: Store, keys: Sequence[int]) -> dict[int, set]:
    out: dict[int, set] = {k: set() for k in keys}
    for i, f in enumerate(files):
        gone = set(f.deleted.rows()) if f.deleted else set()
        for row, k in enumerate(store.keys[f.path]):
            if k in out and row not in gone:
                out[k].add((i, row, hash_of(f.path, row)))
    return out


def found(index: TableIndex, keys: Sequence[int], files: Sequence[DataFile]) -> dict[int, set]:
    return {k: set(v) for k, v in index.lookup(sorted(keys), files).items()}


def test_lookup_finds_every_live_row_of_each_key() -> None:
    store, index = Store(), TableIndex(COLUMNS, "id")
    a = store.file("a", [1, 2, 2, None, 5])
    b = store.file("b", [5, 6, 7], deleted=[1])
    index.update([a, b], store.reader)
    hits = found(index, [1, 2, 5, 6, 9], [a, b])
    assert hits == {
        1: {(0, 0, hash_of("a", 0))},
        2: {(0, 1, hash_of("a", 1)), (0, 2, hash_of("a", 2))},
        5: {(0, 4, hash_of("a", 4)), (1, 0, hash_of("b", 0))},
        6: set(),  # deleted by b's vector
        9: set(),
    }
    # A file no longer in the table is not answered, and the indexes follow the list.
    assert found(index, [5], [b]) == {5: {(0, 0, hash_of("b", 0))}}


def test_only_new_files_are_read_and_a_returning_file_is_answered() -> None:
    store, index = Store(), TableIndex(COLUMNS, "id")
    a, b = store.file("a", [1, 2]), store.file("b", [3])
    index.update([a, b], store.reader)
    c = store.file("c", [1])
    index.update([b, c], store.reader)  # a left the table (a rewrite), c came
    assert store.read == ["a", "b", "c"]
    assert found(index, [1], [b, c]) == {1: {(1, 0, hash_of("c", 0))}}
    # A restore brings a back, in an older state (fewer deleted rows): still indexed.
    index.update([a, b, c], store.reader)
    assert store.read == ["a", "b", "c"]
    assert found(index, [1], [a, b, c]) == expected([a, b, c], store, [1])


def test_adopted_files_are_never_read() -> None:
    store, index = Store(), TableIndex(COLUMNS, "id")
    a = store.file("a", [1, 2])
    index.update([a], store.reader)
    written = store.file("w", [2, 7])
    index.adopt(written, ([2, 7], [hash_of("w", 0), hash_of("w", 1)]))
    index.update([a, written], store.reader)
    assert store.read == ["a"]
    assert found(index, [2, 7], [a, written]) == expected([a, written], store, [2, 7])
    # A description that does not match the file (another row count) is not taken.
    other = store.file("x", [8])
    index.adopt(other, ([8, 9], [0, 0]))
    index.update([a, written, other], store.reader)
    assert store.read == ["a", "x"]


def test_a_failed_read_indexes_nothing() -> None:
    store, index = Store(), TableIndex(COLUMNS, "id")
    a = store.file("a", [1])

    def failing(files: Sequence[DataFile]) -> pa.Table:
        raise OSError("storage unavailable")

    with pytest.raises(OSError):
        index.update([a], failing)
    index.update([a], store.reader)  # the next change reads it again
    assert found(index, [1], [a]) == {1: {(0, 0, hash_of("a", 0))}}


@settings(max_examples=60, deadline=None)
@given(
    versions=st.lists(
        st.lists(
            st.tuples(
                st.lists(st.none() | st.integers(0, 12), min_size=1, max_size=6),
                st.booleans(),
            ),
            max_size=5,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_every_version_is_answered_exactly(
    versions: list[list[tuple[list[int | None], bool]]],
) -> None:
    """Tables of changing files (some with deleted rows), with rebuilds forced often:
    every lookup is what a scan of the current files would find."""
    store, index = Store(), TableIndex(COLUMNS, "id")
    keyindex_recent = keyindex.RECENT_MAX
    keyindex.RECENT_MAX = 5
    try:
        made = 0
        for version in versions:
            files = []
            for keys, with_deleted in version:
                made += 1
                deleted = [0] if with_deleted else []
                files.append(store.file(f"f{made}", keys, deleted))
            index.update(files, store.reader)
            probe = list(range(13))
            assert found(index, probe, files) == expected(files, store, probe)
    finally:
        keyindex.RECENT_MAX = keyindex_recent


def test_rebuilds_drop_the_files_that_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyindex, "RECENT_MAX", 2)
    store, index = Store(), TableIndex(COLUMNS, "id")
    old = [store.file(f"o{i}", [i]) for i in range(4)]
    index.update(old, store.reader)
    builds = index.builds
    new = [store.file("n", [1])]
    index.update(new, store.reader)  # every old row is stale now: rebuilt without them
    assert index.builds == builds + 1
    assert index.rows == 1
    assert found(index, [1], new) == {1: {(0, 0, hash_of("n", 0))}}


def test_key_indexes_are_bounded_by_rows() -> None:
    store = Store()
    indexes = KeyIndexes(max_rows=4)
    assert indexes.get(("o", "s", "big"), COLUMNS, "id", rows=5) is None
    first = indexes.get(("o", "s", "t1"), COLUMNS, "id", rows=3)
    assert first is not None
    first.update([store.file("a", [1, 2, 3])], store.reader)
    second = indexes.get(("o", "s", "t2"), COLUMNS, "id", rows=3)
    assert second is not None
    second.update([store.file("b", [1, 2, 3])], store.reader)
    # Over the bound: the least recently used goes, the one in use stays.
    assert indexes.get(("o", "s", "t2"), COLUMNS, "id", rows=3) is second
    assert indexes.get(("o", "s", "t1"), COLUMNS, "id", rows=3) is not first
    # Another schema (the row hashes cover every column) is another index.
    wider = (*COLUMNS, Field("w", DataType("int64")))
    assert indexes.get(("o", "s", "t2"), wider, "id", rows=3) is not second
    assert KeyIndexes(max_rows=0).get(("o", "s", "t"), COLUMNS, "id", rows=1) is None


@pytest.mark.parametrize(
    ("kind", "key", "ok"),
    [
        ("int64", ["id"], True),
        ("uint32", ["id"], True),
        ("int8", ["id"], True),
        ("uint64", ["id"], False),  # does not fit an int64
        ("string", ["id"], False),
        ("float64", ["id"], False),
        ("int64", ["id", "v"], False),
    ],
)
def test_indexable_keys(kind: str, key: list[str], ok: bool) -> None:
    columns = (Field("id", DataType(kind)), Field("v", DataType("int64")))
    assert indexable(columns, key) is ok
