"""The event archive (issue 8, first part): every stream copied to the object storage
as checksummed segments with a manifest, on local disk and on a real S3 server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.services import Services
from app.settings import Settings
from events.archive import (
    AUTH,
    REGISTRY,
    Archive,
    ArchiveCorrupt,
    Manifest,
    entry_of,
    super_stream,
)
from projections.archiver import Archiver
from projections.replay import replay
from tests.conftest import authed

pytestmark = pytest.mark.anyio
ROWS = "/v1/acme/sales/tables/orders/rows"


def write(settings: Settings, batches: int, **extra: Any) -> None:
    assert settings.redis_url
    app = create_app(settings, settings.redis_url, run_projector=False)
    with authed(TestClient(app)) as c:
        for i in range(batches):
            assert c.post(ROWS, json=[{"id": i, "v": f"row {i}"}]).status_code == 200
        assert c.post("/v1/principals", json={"name": "p", "org": "acme"}).status_code == 201
        for path, body in extra.items():
            assert c.post(path, json=body).status_code < 300


@pytest.fixture
async def services(any_settings: Settings) -> AsyncIterator[Services]:
    settings = msgspec.structs.replace(any_settings, archive=True)
    async with Services.open(settings) as s:
        yield s


async def stream_entries(services: Services, stream: str) -> list[Any]:
    raw = await services.redis.xrange(stream)
    return [entry_of(i, f) for i, f in raw]


async def archived(services: Services, name: str) -> list[Any]:
    return [e async for e in Archive(services.storage).entries(name)]


def archiver(services: Services, **kw: Any) -> Archiver:
    async def supers() -> list[tuple[str, str]]:
        registry = await services.reader.registry()
        return [(o.name, s) for o in registry.orgs.values() for s in o.supers]

    return Archiver(services.redis, services.keys, services.storage, supers, **kw)


async def test_every_stream_is_archived_exactly(services: Services) -> None:
    write(services.settings, 7)
    await services.catch_up()
    archive = Archive(services.storage)
    assert set(await archive.streams()) == {REGISTRY, AUTH, super_stream("acme", "sales")}
    keys = services.keys
    for name, stream in (
        (REGISTRY, keys.registry_stream),
        (AUTH, keys.auth_stream),
        (super_stream("acme", "sales"), keys.stream("acme", "sales")),
    ):
        live = await stream_entries(services, stream)
        assert live and await archived(services, name) == live, name
    # The lag of the archive is in /health (and so in /metrics), and is zero now.
    lags = await services.all_lags()
    assert lags["archive"] == {"lag_events": 0, "lag_seconds": 0.0}


async def test_segments_are_bounded_and_a_restart_resumes_without_duplicates(
    services: Services,
) -> None:
    write(services.settings, 10)
    first = archiver(services, segment_events=4)
    await first.archive_once(force=True)
    await first.release_all()
    name = super_stream("acme", "sales")
    manifest = await Archive(services.storage).manifest(name)
    live = await stream_entries(services, services.keys.stream("acme", "sales"))
    assert [s.count for s in manifest.segments] == [4, 4, 3]  # TableCreated + 10 appends
    assert manifest.position == live[-1][0] and manifest.count == len(live)
    # Redis keeps only a copy of the position: without it, the archive knows.
    await services.redis.delete(services.keys.checkpoint("acme", "sales", "archive"))
    write(services.settings, 2)
    second = archiver(services, segment_events=4)
    assert await second.archive_once(force=True) > 0
    live = await stream_entries(services, services.keys.stream("acme", "sales"))
    assert await archived(services, name) == live
    assert (await Archive(services.storage).manifest(name)).segments[:3] == manifest.segments


async def test_fresh_entries_wait_for_a_full_segment_or_the_interval(services: Services) -> None:
    write(services.settings, 3)
    patient = archiver(services, segment_events=100, interval_s=3600)
    assert await patient.archive_once(force=False) == 0
    lag = (await services.all_lags())["archive"]
    assert lag["lag_events"] > 0
    full = archiver(services, segment_events=2, interval_s=3600, consumer=patient.consumer)
    assert await full.archive_once(force=False) > 0  # full segments go at once
    prompt = archiver(services, segment_events=100, interval_s=0.001, consumer=patient.consumer)
    await prompt.archive_once(force=False)  # the oldest entry is older than the interval
    assert (await services.all_lags())["archive"]["lag_events"] == 0


async def test_a_crash_before_the_manifest_leaves_only_an_unreferenced_file(
    services: Services,
) -> None:
    write(services.settings, 3)
    name = super_stream("acme", "sales")
    archive = Archive(services.storage)
    entries = await stream_entries(services, services.keys.stream("acme", "sales"))
    # A segment written, then the process died before its manifest.
    orphan = services.storage.staging_file(".x")
    orphan.write_bytes(b"half a segment")
    await services.storage.publish(orphan, f".archive/{name}/000000000000-deadbeef.ndjson.gz")
    a = archiver(services)
    await a.archive_once(force=True)
    assert await archived(services, name) == entries
    assert (await archive.manifest(name)).segments[0].key.endswith(".ndjson.gz")
    assert "deadbeef" not in (await archive.manifest(name)).segments[0].key


async def test_a_damaged_or_missing_segment_is_reported(services: Services) -> None:
    write(services.settings, 3)
    await archiver(services).archive_once(force=True)
    name = super_stream("acme", "sales")
    archive = Archive(services.storage)
    info = (await archive.manifest(name)).segments[0]
    data = await services.storage.read(info.key)
    assert data is not None
    damaged = services.storage.staging_file(".x")
    damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    await services.storage.publish(damaged, info.key)
    with pytest.raises(ArchiveCorrupt, match="checksum"):
        await archived(services, name)
    await services.storage.delete(info.key)
    with pytest.raises(ArchiveCorrupt, match="missing"):
        await archived(services, name)


async def test_two_archivers_share_the_streams_without_a_duplicate(services: Services) -> None:
    write(services.settings, 12)
    a, b = archiver(services, segment_events=3), archiver(services, segment_events=3)

    async def run(x: Archiver) -> None:
        await x.archive_once(force=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, a)
        tg.start_soon(run, b)
    # Each stream was taken by one of them; whichever, once the leases are released
    # the other completes nothing twice.
    await a.release_all()
    await b.release_all()
    await archiver(services, segment_events=3).archive_once(force=True)
    for name, stream in (
        (REGISTRY, services.keys.registry_stream),
        (super_stream("acme", "sales"), services.keys.stream("acme", "sales")),
    ):
        assert await archived(services, name) == await stream_entries(services, stream)


async def test_an_archive_append_must_follow_its_manifest(services: Services) -> None:
    archive = Archive(services.storage)
    manifest = await archive.append(Manifest("x/y"), [("5-0", {"a": "b"})])
    with pytest.raises(ValueError, match="not after"):
        await archive.append(manifest, [("4-0", {"a": "b"})])
    assert [e async for e in archive.entries("x/y")] == [("5-0", {"a": "b"})]
    assert [e async for e in archive.entries("x/y", after="5-0")] == []


# -- trimming: the archive and the stream read as one log -----------------------------


@pytest.fixture
async def trimming(any_settings: Settings) -> AsyncIterator[Services]:
    settings = msgspec.structs.replace(
        any_settings, archive=True, stream_retention_s=0.001, archive_segment_events=4
    )
    async with Services.open(settings) as s:
        yield s


async def all_events(services: Services) -> list[Any]:
    return await services.log.read("acme", "sales", count=100_000)


async def test_trimmed_events_come_from_the_archive(trimming: Services) -> None:
    from datetime import UTC, datetime, timedelta

    from app.ops.gc import collect_garbage
    from projections.replay import replay

    services = trimming
    write(services.settings, 12)
    stream = services.keys.stream("acme", "sales")
    everything = await all_events(services)  # before any trim: all in Redis
    assert len(everything) == 13
    await services.catch_up()  # projections, then the archive, which trims
    assert await services.redis.xlen(stream) < 4  # Redis keeps only the unarchived tail
    mark = (await services.redis.get(services.keys.trimmed("acme", "sales"))).decode()
    assert mark > "0-0"
    # One log: every read sees every event, in order, whatever Redis still holds.
    assert [e.id for e in await all_events(services)] == [e.id for e in everything]
    middle = everything[5].id
    page = await services.log.read_from("acme", "sales", middle, count=3)
    assert [e.id for e in page] == [e.id for e in everything[5:8]]
    page = await services.log.read("acme", "sales", after=middle, count=100)
    assert [e.id for e in page] == [e.id for e in everything[6:]]
    assert (await replay(services.log, services.store, verify=True)).differences == []
    await replay(services.log, services.store, verify=False)  # a rebuild reads it all too
    assert (await replay(services.log, services.store, verify=True)).differences == []
    # gc still knows every file an old version (time travel, restore) references.
    report = await collect_garbage(
        services.log, services.reader, services.storage, grace=timedelta(hours=2),
        dry_run=True, now=datetime.now(UTC) + timedelta(days=1),
    )  # fmt: skip
    assert report.orphans == [] and report.referenced >= 12
    # The API: history, the events, time travel to the first version, new writes.
    assert services.settings.redis_url
    app = create_app(services.settings, services.settings.redis_url, run_projector=False)
    with authed(TestClient(app)) as c:
        history = c.get(f"{ROWS[:-5]}/history", params={"limit": 100}).json()["entries"]
        assert [h["version"] for h in history] == list(range(13))
        events = c.get("/v1/events", params={"org": "acme", "super": "sales"}).json()
        assert [e["id"] for e in events["events"]] == [e.id for e in everything]
        old = c.post("/v1/acme/sales/query",
                     json={"sql": "select count(*) from orders", "as_of_version": 1})  # fmt: skip
        assert old.json()["rows"] == [[1]]
        assert c.post(ROWS, json=[{"id": 99, "v": "after"}]).json()["version"] == 13


async def test_a_stream_is_never_trimmed_past_the_archive_or_a_projection(
    trimming: Services,
) -> None:
    services = trimming
    write(services.settings, 6)
    await services.catch_up()
    stream = services.keys.stream("acme", "sales")
    kept = await services.redis.xlen(stream)
    # New events, applied by the projections but not archived yet: all stay in Redis.
    write(services.settings, 5)
    projector = services.projector()
    await projector.run_until_caught_up()
    await projector.release_all()
    patient = archiver(services, segment_events=100, interval_s=3600,
                       retention_s=0.001, projections=("catalog",))  # fmt: skip
    await patient.archive_once(force=False)
    assert await services.redis.xlen(stream) == kept + 5
    # A projection that has not applied them (a mirror group without a checkpoint yet)
    # keeps them in Redis even once they are archived.
    await services.redis.delete(services.keys.checkpoint("acme", "sales", "mirror-delta"))
    strict = archiver(
        services, retention_s=0.001, projections=("catalog", "mirror-delta"),
        consumer=patient.consumer,
    )  # fmt: skip
    await strict.archive_once(force=True)
    assert await services.redis.xlen(stream) == kept + 5
    assert len(await all_events(services)) == 1 + 6 + 5


async def test_long_archives_are_sealed_in_chapters(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    import events.archive

    monkeypatch.setattr(events.archive, "CHAPTER_SEGMENTS", 3)
    write(services.settings, 15)
    await archiver(services, segment_events=2).archive_once(force=True)
    name = super_stream("acme", "sales")
    archive = Archive(services.storage)
    manifest = await archive.manifest(name)
    live = await stream_entries(services, services.keys.stream("acme", "sales"))
    assert len(manifest.chapters) == 2 and len(manifest.segments) == 2  # 8 segments
    assert manifest.count == len(live) and manifest.position == live[-1][0]
    assert await archived(services, name) == live
    middle = live[7][0]
    assert [e async for e in archive.entries(name, middle)] == live[8:]
    assert [e async for e in archive.entries(name, middle, inclusive=True)] == live[7:]
    chapter = manifest.chapters[0]
    staged = services.storage.staging_file(".x")
    staged.write_bytes(b"{}")
    await services.storage.publish(staged, chapter.key)
    with pytest.raises(ArchiveCorrupt, match="chapter"):
        await archived(services, name)


async def test_a_trim_while_the_archive_is_read_hides_no_event(trimming: Services) -> None:
    """Regression (review): a read below the mark read the archive, then Redis from the
    old mark; a trim in between lost the events from the old to the new mark. The real
    archiver runs at that very moment here (injected into the archive read)."""
    services = trimming
    write(services.settings, 12)
    await services.catch_up()  # archived and trimmed: a first mark
    write(services.settings, 8)  # applied by the projections, not archived yet
    projector = services.projector()
    await projector.run_until_caught_up()
    await projector.release_all()
    for runner in services.mirror_runners():
        await runner.run_until_caught_up()
        await runner.release_all()
    expected = [e.id for e in await all_events(services)]
    assert len(expected) == 1 + 12 + 8
    archive = services.log.archive
    assert archive is not None
    original = archive.entries
    fired = []

    async def entries(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for entry in original(*args, **kwargs):
            if not fired:  # the archiver's next pass lands while this read is under way
                fired.append(True)
                a = services.archiver()
                await a.archive_once(force=True)
                await a.release_all()
            yield entry

    archive.entries = entries  # type: ignore[method-assign]
    try:
        got = [e.id for e in await all_events(services)]
    finally:
        archive.entries = original  # type: ignore[method-assign]
    assert fired and got == expected


async def test_a_stale_writer_cannot_undo_a_newer_manifest(trimming: Services) -> None:
    """Regression (review): an archiver whose lease lapsed during a slow manifest write
    overwrote the manifest of the one that took over (and had trimmed the stream), so
    the events between were lost for good. Manifests are versions now."""
    services = trimming
    write(services.settings, 4)

    async def project() -> None:
        p = services.projector()
        await p.run_until_caught_up()
        await p.release_all()
        for r in services.mirror_runners():
            await r.run_until_caught_up()
            await r.release_all()

    await project()
    stale = services.archiver()
    original_put = stale.archive._put
    fired = []

    async def slow_put(key: str, data: bytes) -> None:
        if "/supers/acme/sales/manifests/" in key and not fired:
            fired.append(True)
            # The stale writer's PUT hangs; its lease lapses; another takes over.
            await services.redis.delete(services.keys.lease("acme", "sales", "archive"))
            write(services.settings, 4)
            await project()
            other = services.archiver()
            await other.archive_once(force=True)  # archives and trims
            await other.release_all()
        await original_put(key, data)  # the stale manifest lands last

    stale.archive._put = slow_put  # type: ignore[method-assign]
    await stale.archive_once(force=True)
    await stale.release_all()
    assert fired
    after = services.archiver()
    await after.archive_once(force=True)
    await after.release_all()
    assert len(await all_events(services)) == 1 + 4 + 4
    assert len(await archived(services, super_stream("acme", "sales"))) == 1 + 4 + 4


async def test_recovery_keeps_redis_as_small_as_the_retention_did(
    trimming: Services, tmp_path: Path
) -> None:
    """Regression (review): recover put the whole history back into Redis, defeating
    the retention. Old events stay in the archive only, behind a mark."""
    from app.ops.recover import recover
    from tests.conftest import start_redis

    services = trimming
    write(services.settings, 12)
    await services.catch_up()
    everything = [e.id for e in await all_events(services)]
    (tmp_path / "redis2").mkdir()
    proc, url = start_redis(tmp_path / "redis2")
    try:
        fresh = msgspec.structs.replace(services.settings, redis_url=url)
        async with Services.open(fresh) as other:
            report = await recover(other)
            assert report.events >= len(everything)
            assert await other.redis.xlen(other.keys.stream("acme", "sales")) == 0
            assert await other.redis.get(other.keys.trimmed("acme", "sales"))
            assert [e.id for e in await all_events(other)] == everything
            assert (await replay(other.log, other.store, verify=True)).differences == []
    finally:
        proc.terminate()
        proc.wait()
