"""The catalog fold is pure: same events, same state; every event advances the position."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from events.model import (
    ColumnStats,
    DataFile,
    DataType,
    Field,
    OrgCreated,
    RowsAppended,
    SchemaEvolved,
    SuperCreated,
    TableCreated,
    TableOverwritten,
)
from projections.catalog import (
    RegistryState,
    SuperState,
    apply_super,
    fold_registry,
    fold_super,
)

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
