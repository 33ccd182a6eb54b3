"""Garbage collection of orphan files, on local disk and S3, alone and under writes."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest

from app.ops.gc import GcRefused, collect_garbage, parse_duration
from app.services import Services
from app.settings import Settings
from app.write.request import IngestRequest
from events.storage.port import data_file_key

pytestmark = pytest.mark.anyio
HOUR = timedelta(hours=1)


@pytest.fixture
async def svc(any_settings: Settings) -> AsyncIterator[Services]:
    async with Services.open(any_settings) as services:
        yield services


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


@pytest.fixture
async def quick(any_settings: Settings) -> AsyncIterator[Services]:
    """Services whose writers use a short gc grace period (5 s)."""
    async with Services.open(msgspec.structs.replace(any_settings, gc_grace_s=5.0)) as services:
        yield services


def age(services: Services, key: str) -> bool:
    """Make a local file an hour old (S3 objects cannot be back-dated)."""
    if services.settings.storage_url:
        return False
    path = services.settings.storage_root / key
    old = (datetime.now(UTC) - HOUR).timestamp()
    os.utime(path, (old, old))
    return True


async def test_gc_never_deletes_a_referenced_file_under_concurrent_writes(
    quick: Services, tmp_path: Path
) -> None:
    """gc with the writers' own (short) grace period runs over and over while files land."""
    svc = quick
    await write(svc, tmp_path, "a", [{"i": -1}])  # records the writers' grace: 5 s
    aged = {k for k in [await orphan(svc, "a"), await orphan(svc, "b")] if age(svc, k)}
    done = anyio.Event()
    deleted: set[str] = set()

    async def writer(table: str) -> None:
        for i in range(15):
            await write(svc, tmp_path, table, [{"i": i}])

    async def collector() -> None:
        while not done.is_set():
            report = await collect_garbage(
                svc.log, svc.reader, svc.storage, grace=timedelta(seconds=5), dry_run=False
            )
            deleted.update(o.key for o in report.orphans)
            await anyio.lowlevel.checkpoint()  # let the writers run between passes

    async with anyio.create_task_group() as tg:
        tg.start_soon(collector)
        async with anyio.create_task_group() as writers:
            for table in ("a", "b", "c"):
                writers.start_soon(writer, table)
        done.set()
    referenced = await live_files(svc)
    assert len(referenced) == 46
    assert not deleted & referenced  # gc never picked a file an event references
    assert deleted == aged  # and it did pick the old orphans
    stored = {o.key async for o in svc.storage.list_objects()}
    assert referenced <= stored
    state = await svc.reader.super_state("o", "s")
    got = await svc.engine.run(
        state, "select (select count(*) from a) + (select count(*) from b) + "
        "(select count(*) from c) as n",
    )  # fmt: skip
    assert got.table.to_pylist() == [{"n": 46}]


async def test_gc_refuses_a_grace_shorter_than_the_writers(quick: Services, tmp_path: Path) -> None:
    await write(quick, tmp_path, "t", [{"x": 1}])
    with pytest.raises(GcRefused, match="shorter than"):
        await collect_garbage(
            quick.log, quick.reader, quick.storage, grace=timedelta(seconds=4), dry_run=True
        )


async def test_gc_against_an_empty_log_deletes_nothing(svc: Services, tmp_path: Path) -> None:
    """A gc pointed at the wrong Redis (or prefix) must not see every file as an orphan."""
    await write(svc, tmp_path, "t", [{"x": 1}])
    await orphan(svc, "t")
    stranger = msgspec.structs.replace(svc.settings, redis_prefix=f"other{uuid.uuid4().hex[:6]}")
    async with Services.open(stranger) as wrong:
        later = datetime.now(UTC) + 2 * HOUR
        report = await collect_garbage(
            wrong.log, wrong.reader, wrong.storage, grace=HOUR, dry_run=False, now=later
        )
    assert report.scanned == 0 and report.deleted == 0
    assert len([o async for o in svc.storage.list_objects()]) == 2


def test_durations() -> None:
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("7d") == timedelta(days=7)
    with pytest.raises(ValueError):
        parse_duration("soon")
