"""A writer appends from the table's state as its own last append left it, without
reading the log's tail first; whatever else changed the table in between (another
process's write, a schema change, a drop, a change of this process) is still folded in.

Two ``Writer`` objects on one Redis are two processes: each has its own known state.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from app.services import Services
from app.write.append import Writer
from app.write.changes.commit import Target
from app.write.request import IngestRequest
from events.errors import ConflictError

pytestmark = pytest.mark.anyio


def rows(tmp: Path, data: list[dict[str, Any]], **kw: Any) -> IngestRequest:
    path = tmp / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(data))
    return IngestRequest("o", "s", "t", path, "json", **kw)


def other_process(services: Services) -> Writer:
    return Writer(services.log, services.reader, services.storage)


async def calls(services: Services, command: str) -> int:
    """Calls of ``command`` Redis has served so far."""
    stats: Any = await services.redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def tail_reads(services: Services) -> int:
    """The writer's reads of the log's tail (XRANGE)."""
    return await calls(services, "xrange")


async def table_rows(services: Services, sql: str = "select * from t order by id") -> list[Any]:
    state = await services.reader.super_state("o", "s")
    got = await services.engine.run(state, sql)
    return got.table.to_pylist()


async def test_appends_after_its_own_read_no_tail(services: Services, tmp_path: Path) -> None:
    writer = other_process(services)
    await writer.ingest(rows(tmp_path, [{"id": 0}]))
    before = await tail_reads(services)
    for i in range(1, 11):
        result = await writer.ingest(rows(tmp_path, [{"id": i}]))
        assert result.version == i + 1
    assert await tail_reads(services) == before
    assert [r["id"] for r in await table_rows(services)] == list(range(11))
    assert (await services.reader.super_state("o", "s")).tables["t"].version == 11


async def test_another_processs_schema_change_is_folded_in(
    services: Services, tmp_path: Path
) -> None:
    ours, theirs = other_process(services), other_process(services)
    await ours.ingest(rows(tmp_path, [{"id": 1, "v": 1}]))
    await theirs.ingest(rows(tmp_path, [{"id": 2, "v": 2, "extra": "x"}]))
    # Our known state is version 1 without "extra": the compare-and-set fails, the
    # writer reads the tail, and the rows land under the evolved schema.
    result = await ours.ingest(rows(tmp_path, [{"id": 3, "v": 3}]))
    assert result.version == 4  # created, appended, evolved + appended, appended
    assert await table_rows(services) == [
        {"id": 1, "v": 1, "extra": None},
        {"id": 2, "v": 2, "extra": "x"},
        {"id": 3, "v": 3, "extra": None},
    ]
    # And from there on it knows the table again: no more tail reads.
    before = await tail_reads(services)
    await ours.ingest(rows(tmp_path, [{"id": 4, "v": 4}]))
    assert await tail_reads(services) == before


async def test_a_type_the_other_process_fixed_is_checked(
    services: Services, tmp_path: Path
) -> None:
    ours, theirs = other_process(services), other_process(services)
    await ours.ingest(rows(tmp_path, [{"id": 1}]))
    await theirs.ingest(rows(tmp_path, [{"id": 2, "name": "text"}]))
    # Known state: no "name" column, so alone this would create it as an int.
    with pytest.raises(Exception) as refused:
        await ours.ingest(rows(tmp_path, [{"id": 3, "name": 7}]))
    assert getattr(refused.value, "code", "") == "type_mismatch"
    assert [r["id"] for r in await table_rows(services)] == [1, 2]


async def test_if_match_is_checked_against_the_log_not_the_known_state(
    services: Services, tmp_path: Path
) -> None:
    ours, theirs = other_process(services), other_process(services)
    await ours.ingest(rows(tmp_path, [{"id": 1}]))
    await theirs.ingest(rows(tmp_path, [{"id": 2}]))
    result = await ours.ingest(rows(tmp_path, [{"id": 3}], if_match=2))
    assert result.version == 3
    with pytest.raises(ConflictError):  # the known state (3) is not what If-Match trusts
        await ours.ingest(rows(tmp_path, [{"id": 4}], if_match=2))
    assert [r["id"] for r in await table_rows(services)] == [1, 2, 3]


async def test_a_drop_and_recreate_elsewhere_is_not_written_past(
    services: Services, tmp_path: Path
) -> None:
    ours, theirs = other_process(services), other_process(services)
    await ours.ingest(rows(tmp_path, [{"id": 1}]))
    await services.mutator.drop(Target("o", "s", "t"))
    await theirs.ingest(rows(tmp_path, [{"id": 9, "w": "new"}]))
    await ours.ingest(rows(tmp_path, [{"id": 2}]))
    state = await services.reader.super_state("o", "s")
    assert await table_rows(services) == [{"id": 2, "w": None}, {"id": 9, "w": "new"}]
    assert state.tables["t"].incarnation != ""


async def test_a_change_of_this_process_is_not_undone(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = services.writer  # the one the change path shares the turn with
    conflicts: list[int] = []
    after_conflict = writer._after_conflict

    async def counted(*args: Any) -> None:
        conflicts.append(1)
        await after_conflict(*args)

    monkeypatch.setattr(writer, "_after_conflict", counted)
    await writer.ingest(rows(tmp_path, [{"id": 1}, {"id": 2}]))
    await services.mutator.delete(Target("o", "s", "t"), keys={"id": [1]})
    # The change made the writer forget the table: it reads the tail and appends, with
    # no compare-and-set lost to a stale state.
    await writer.ingest(rows(tmp_path, [{"id": 3}]))
    assert conflicts == []
    assert [r["id"] for r in await table_rows(services)] == [2, 3]
    assert (await services.reader.super_state("o", "s")).tables["t"].version == 3
