"""The catalog fold is pure: same events, same state; every event advances the position."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import (
    ColumnStats,
    DataFile,
    DataType,
    Field,
    OrgCreated,
    RowsAppended,
    RowsDeleted,
    SchemaEvolved,
    SuperCreated,
    TableCreated,
    TableDropped,
    TableOverwritten,
)
from projections.catalog import (
    RegistryState,
    SuperFolder,
    SuperState,
    apply_super,
    fold_registry,
    fold_super,
)
from projections.store import encode_table

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INT = DataType(kind="int64")
common = {"org": "o", "super_": "s", "table": "t", "actor": "me", "time": T0}


def f(path: str, rows: int, lo: object = None, hi: object = None) -> DataFile:
    stats = {"x": ColumnStats(null_count=0, min=lo, max=hi)}
    return DataFile(path=path, rows=rows, size_bytes=rows * 10, columns=stats)


def history() -> list:
    return [
        TableCreated(id="1-0", version=0, columns=(Field("x", INT),), **common),
        RowsAppended(id="1-1", version=1, files=(f("a", 3, 1, 5),), rows=3, **common),
        RowsAppended(id="2-0", version=2, files=(f("b", 2, -4, 2),), rows=2, **common),
    ]


def test_fold_builds_table_with_version_files_and_stats() -> None:
    state = fold_super(SuperState(org="o", name="s"), history())
    table = state.tables["t"]
    assert state.position == "2-0"
    assert table.version == 2
    assert [x.path for x in table.files] == ["a", "b"]
    assert table.row_count == 5
    assert table.size_bytes == 50
    assert table.column_stats()["x"] == ColumnStats(null_count=0, min=-4, max=5)


def test_fold_is_pure_and_deterministic() -> None:
    empty = SuperState(org="o", name="s")
    a = fold_super(empty, history())
    b = fold_super(empty, history())
    assert msgspec.json.encode(a) == msgspec.json.encode(b)
    assert empty.tables == {}  # the input state was not changed


def test_schema_evolution_and_overwrite() -> None:
    events = [
        *history(),
        SchemaEvolved(
            id="3-0",
            version=3,
            columns=(Field("x", INT), Field("y", DataType(kind="string"))),
            added=("y",),
            **common,
        ),
        TableOverwritten(
            id="3-1",
            version=4,
            files=(f("c", 7),),
            removed_files=("a", "b"),
            rows=7,
            rows_removed=5,
            **common,
        ),
    ]
    table = fold_super(SuperState(org="o", name="s"), events).tables["t"]
    assert [c.name for c in table.columns] == ["x", "y"]
    assert [x.path for x in table.files] == ["c"]
    assert table.version == 4
    # y is in no file: all its values are null
    assert table.column_stats()["y"].null_count == 7


def test_event_for_unknown_table_is_rejected() -> None:
    event = RowsAppended(id="1-0", version=1, files=(f("a", 1),), rows=1, **common)
    with pytest.raises(ValueError, match="before it exists"):
        apply_super(SuperState(org="o", name="s"), event)


def test_decimal_stats_compare_as_numbers() -> None:
    dec = DataType(kind="decimal", precision=10, scale=2)
    events = [
        TableCreated(id="1-0", version=0, columns=(Field("x", dec),), **common),
        RowsAppended(id="1-1", version=1, files=(f("a", 1, "9.50", "9.50"),), rows=1, **common),
        RowsAppended(id="1-2", version=2, files=(f("b", 1, "10.25", "10.25"),), rows=1, **common),
    ]
    stats = fold_super(SuperState(org="o", name="s"), events).tables["t"].column_stats()["x"]
    assert (stats.min, stats.max) == ("9.50", "10.25")


def test_registry_fold_creates_orgs_and_supers_once() -> None:
    reg = {"actor": "me", "time": T0}
    events = [
        OrgCreated(id="1-0", org="o", super_="s", **reg),
        SuperCreated(id="1-1", org="o", super_="s", **reg),
        SuperCreated(id="1-2", org="o", super_="s2", **reg),
        OrgCreated(id="1-3", org="o", super_="s3", **reg),  # a duplicate: ignored
    ]
    state = fold_registry(RegistryState(), events)
    assert list(state.orgs) == ["o"]
    assert sorted(state.orgs["o"].supers) == ["s", "s2"]
    assert state.position == "1-3"


# -- the replay fold (SuperFolder) is apply_super, faster -------------------------------


def _random_history(draw: st.DrawFn) -> list[Any]:
    """A valid history of two tables: creates, appends, overwrites, deletes (files
    replaced), schema changes, drops and re-creates, in any order."""
    events: list[Any] = []
    live: dict[str, list[str]] = {}
    version: dict[str, int] = {}
    for n in range(1, draw(st.integers(0, 40)) + 1):
        table = draw(st.sampled_from(["t", "u"]))
        base = {**common, "table": table, "id": f"{n}-0"}
        v = version.get(table, -1) + 1
        if table not in live:
            events.append(TableCreated(version=v, columns=(Field("x", INT),), **base))
            live[table] = []
        else:
            kind = draw(
                st.sampled_from(["append", "append", "append", "over", "del", "drop", "evolve"])
            )
            if kind == "append":
                files = tuple(f(f"{table}{n}-{k}", 1 + k) for k in range(draw(st.integers(1, 3))))
                events.append(RowsAppended(version=v, files=files, rows=1, **base))
                live[table] += [x.path for x in files]
            elif kind == "over":
                events.append(
                    TableOverwritten(
                        version=v, files=(f(f"{table}{n}", 2),), removed_files=tuple(live[table]),
                        rows=2, rows_removed=0, **base,
                    )
                )  # fmt: skip
                live[table] = [f"{table}{n}"]
            elif kind == "del" and live[table]:
                gone = draw(st.sampled_from(live[table]))
                events.append(
                    RowsDeleted(version=v, files=(), removed_files=(gone,), rows_removed=1, **base)
                )
                live[table].remove(gone)
            elif kind == "drop":
                events.append(TableDropped(version=v, rows=0, **base))
                del live[table]
            else:
                cols = (Field("x", INT), Field(f"c{n}", INT))
                events.append(SchemaEvolved(version=v, columns=cols, added=(f"c{n}",), **base))
        version[table] = v
    return events


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_the_replay_folder_gives_exactly_what_apply_super_gives(data: st.DataObject) -> None:
    events = data.draw(st.composite(_random_history)())
    expected = fold_super(SuperState(org="o", name="s"), events)
    folder = SuperFolder()
    for event in events:
        folder.add(event)
    got = folder.result()
    assert {k: encode_table(v) for k, v in got.items()} == {
        k: encode_table(v) for k, v in expected.tables.items()
    }


def test_files_are_read_without_union_by_name_only_when_their_layouts_agree() -> None:
    from projections.query.views import _same_layout

    def g(cols: dict[str, int], rows: int = 3) -> DataFile:
        stats = {c: ColumnStats(null_count=n) for c, n in cols.items()}
        return DataFile(path="p", rows=rows, size_bytes=1, columns=stats)

    both = {"x", "y"}
    assert _same_layout([g({"x": 0, "y": 1}), g({"y": 0, "x": 2})], both)
    assert not _same_layout([g({"x": 0, "y": 0}), g({"x": 0})], both)  # a column missing
    assert not _same_layout([g({"x": 0, "y": 3}), g({"x": 0, "y": 0})], both)  # all null
    assert not _same_layout([g({"x": 0, "y": 0}, rows=0)], both)  # an empty file
