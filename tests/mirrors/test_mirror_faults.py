"""Regression tests for the mirror runner hardening that followed a review: faults in
the middle of publishing (a lease lost, copies deleted by another process, a half-deleted
Delta log, a table that fails, a legacy status, a removal that fails) and the Iceberg
snapshot expiry rule.

Everything is real: Redis, local storage, the runners and the publishers. The only
addition is ``PausingPublisher``, a real ``Publisher`` that stops after one table until
the test resumes it (a publish as slow as the test needs, without sleeping). Each test
says in a comment how it failed before the fix."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import polars as pl
import pytest
from deltalake.exceptions import DeltaError

import mirrors.runner
from app.services import Services
from app.settings import Settings
from mirrors import iceberg
from mirrors.access import access_for
from mirrors.plan import MirrorFile
from mirrors.publisher import Publisher
from mirrors.runner import LeaseLost, MirrorRunner
from mirrors.status import MirrorStatus, MirrorStatuses, encode_status
from projections.catalog import TableState
from tests.mirrors.test_mirror_runner import (
    FORMATS,
    delta_commits,
    delta_ids,
    drain,
    iceberg_ids,
    ids,
    location,
    mirror,
    run_mirrors,
    runner,
    with_services,
)
from tests.support.lake import ORG, SUP, TBL, append, detail, ok, table_url
from tests.support.mirror_lake import Lake, open_lake

LEASE_MS = 300


# -- helpers ---------------------------------------------------------------------------


class PausingPublisher(Publisher):
    """A real publisher that, once it has published ``pause_after``, waits until the
    test sets ``resume`` (``paused`` tells the test it got there)."""

    def __init__(self, *args: Any, pause_after: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause_after = pause_after
        self.paused = anyio.Event()
        self.resume = anyio.Event()
        self.published_tables: list[str] = []

    async def publish(
        self, org: str, super_: str, table: TableState, previous: MirrorStatus | None
    ) -> MirrorStatus:
        status = await super().publish(org, super_, table, previous)
        self.published_tables.append(table.name)
        if table.name == self.pause_after:
            self.paused.set()
            await self.resume.wait()
        return status


def pausing_delta_runner(services: Services, pause_after: str) -> MirrorRunner:
    """A Delta runner with a short lease, as ``Services.mirror_runners()`` builds it."""
    publisher = PausingPublisher(
        "delta", services.storage, access_for(services.storage), pause_after=pause_after
    )
    return MirrorRunner(
        services.redis,
        services.keys,
        services.store,
        publisher,
        default_formats=services.settings.mirror_formats,
        lease_ms=LEASE_MS,
    )


def failed_tables(lake: Lake) -> dict[str, int]:
    lags = ok(lake.client.get("/health"))["projections"]
    return {fmt: lags[f"mirror-{fmt}"]["failed_tables"] for fmt in FORMATS}


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def rest_tables(lake: Lake) -> list[str]:
    body = ok(lake.client.get(f"/iceberg/v1/namespaces/{ORG}.{SUP}/tables"))
    return [t["name"] for t in body["identifiers"]]


# -- 1. the lease is held while publishing ---------------------------------------------


def test_the_heartbeat_holds_the_lease_through_a_long_publish(local_lake: Lake) -> None:
    # Pre-fix: nothing renewed the lease during a publish: no renewal arrives while the
    # publisher is paused, the lease lapses after LEASE_MS and another runner takes it.
    c, settings = local_lake.client, local_lake.settings
    for table in ("a", "b"):
        append(c, ids(1), table=table)

    async def go(services: Services) -> None:
        one = pausing_delta_runner(services, pause_after="a")
        publisher = one.publisher
        assert isinstance(publisher, PausingPublisher)
        lease = services.keys.lease(ORG, SUP, one.group)
        previous = (await services.redis.config_get("notify-keyspace-events"))[
            "notify-keyspace-events"
        ]
        await services.redis.config_set("notify-keyspace-events", "Kg")  # renewals: "expire"
        pubsub = services.redis.pubsub()
        try:
            await pubsub.subscribe(f"__keyspace@0__:{lease}")
            confirmed = await pubsub.get_message(timeout=1)
            assert confirmed is not None and confirmed["type"] == "subscribe"
            async with anyio.create_task_group() as tg:
                tg.start_soon(one.run_until_caught_up)
                with anyio.fail_after(10):
                    await publisher.paused.wait()
                paused_at = time.monotonic()
                # The publish of `a` now lasts as long as the test wants: for twice the
                # lease, each renewal must come within a second of the previous one.
                while time.monotonic() - paused_at < 2 * LEASE_MS / 1000:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    assert message is not None, "the lease was not renewed while publishing"
                assert text(await services.redis.get(lease)) == one.consumer
                two = MirrorRunner(
                    services.redis,
                    services.keys,
                    services.store,
                    Publisher("delta", services.storage, access_for(services.storage)),
                    default_formats=services.settings.mirror_formats,
                    lease_ms=LEASE_MS,
                )
                with anyio.fail_after(10):
                    await two.run_until_caught_up()
                assert two.published == 0 and not two.units  # it could not take the super
                publisher.resume.set()
            assert one.published == 2 and publisher.published_tables == ["a", "b"]
            await one.release_all()
            await two.release_all()
        finally:
            await pubsub.aclose()
            await services.redis.config_set("notify-keyspace-events", previous)

    with_services(settings, go)
    assert delta_ids(settings, "a") == delta_ids(settings, "b") == [0]
    for table in ("a", "b"):
        status = mirror(local_lake, table)["delta"]
        assert status["error"] is None and status["version"] == detail(c, table)["version"]


def test_a_runner_that_lost_its_lease_writes_no_further_table(local_lake: Lake) -> None:
    # Pre-fix: the lease was never checked during a publish: after the steal the runner
    # went on to publish `b` (a Delta log under another runner's lease) without LeaseLost.
    c, settings = local_lake.client, local_lake.settings
    for table in ("a", "b"):
        append(c, ids(1), table=table)

    async def go(services: Services) -> None:
        one = pausing_delta_runner(services, pause_after="a")
        publisher = one.publisher
        assert isinstance(publisher, PausingPublisher)
        lease = services.keys.lease(ORG, SUP, one.group)

        async def run() -> None:
            with pytest.raises(LeaseLost), anyio.fail_after(10):
                await one.run_until_caught_up()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(10):
                await publisher.paused.wait()
            await services.redis.set(lease, "another-runner", px=60_000)  # stolen
            publisher.resume.set()
        await one.release_all()  # compare-and-delete: the thief's lease stays
        assert text(await services.redis.get(lease)) == "another-runner"
        status_key = MirrorStatuses(services.redis, services.keys).key(ORG, SUP, "delta")
        assert await services.redis.hlen(status_key) == 0  # nothing committed either
        assert publisher.published_tables == ["a"]

    with_services(settings, go)
    assert delta_ids(settings, "a") == [0]  # published before the steal
    assert not (Path(location(settings, "b")) / "_delta_log").exists()


# -- 2. copies are not cached across processes -----------------------------------------


def test_copies_deleted_by_another_runner_are_made_again(local_mirror_settings: Settings) -> None:
    # Pre-fix: runner A cached the copies it made; runner B (another process) deleted
    # them when the format was turned off; A, turned on again, committed the missing
    # copies from its cache: a Delta log over files that do not exist (unreadable).
    settings = msgspec.structs.replace(local_mirror_settings, inline_max_rows=100)
    with contextlib.contextmanager(open_lake)(settings) as lake:
        c = lake.client
        append(c, ids(2))  # inlined: the Delta mirror reads a copy of the batch
        copies = Path(location(settings)) / "mirror" / "delta"

        async def go(one: Services) -> None:
            async with Services.open(settings) as two:
                a, b = runner(one, "delta"), runner(two, "delta")
                await drain(a)
                assert len(list(copies.rglob("*.parquet"))) == 1
                ok(c.put(table_url(suffix="/mirrors"), json={"formats": []}))
                await drain(b)
                assert not list(copies.rglob("*.parquet"))
                ok(c.put(table_url(suffix="/mirrors"), json={"formats": ["delta"]}))
                await drain(a)

        with_services(settings, go)
        assert len(list(copies.rglob("*.parquet"))) == 1
        status = mirror(lake)["delta"]
        assert status["error"] is None and status["version"] == detail(c)["version"]
        assert delta_ids(settings) == [0, 1]


# -- 3. a half-deleted Delta log is recreated ------------------------------------------


@pytest.mark.parametrize("damage", ["checkpoint-gone", "first-commits-gone"])
def test_a_half_deleted_delta_log_is_recreated(
    local_mirror_settings: Settings, damage: str
) -> None:
    # Pre-fix: loading the damaged log raised a DeltaError other than "no table", so
    # every publish failed (status error) and the mirror stayed unreadable.
    settings = msgspec.structs.replace(local_mirror_settings, mirror_checkpoint_interval=1)
    with contextlib.contextmanager(open_lake)(settings) as lake:
        c = lake.client
        append(c, ids(2))
        lake.sync()
        append(c, ids(1, 2))
        lake.sync()
        log_dir = Path(location(settings)) / "_delta_log"
        checkpoints = list(log_dir.glob("*.checkpoint.parquet"))
        assert checkpoints and (log_dir / "_last_checkpoint").exists()
        for path in checkpoints:
            path.unlink()
        if damage == "first-commits-gone":
            # Where a removal (hint, checkpoints, then commits in order) was cut short.
            (log_dir / "_last_checkpoint").unlink()
            (log_dir / f"{0:020}.json").unlink()
        with pytest.raises(DeltaError):
            pl.read_delta(location(settings))

        append(c, ids(1, 3))
        lake.sync()
        status = mirror(lake)["delta"]
        assert status["error"] is None, status["error"]
        assert status["version"] == detail(c)["version"] and status["lag_versions"] == 0
        assert delta_ids(settings) == iceberg_ids(lake) == [0, 1, 2, 3]
        assert len(delta_commits(settings)) == 1  # a new log, with one commit


# -- 4. failed tables are retried by a long-lived runner -------------------------------


def test_a_failed_table_is_retried_without_a_new_write(
    local_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pre-fix: a failed table was retried only on its next write or at a runner start,
    # so the same long-lived runner left it failed (and /health had no failed_tables).
    monkeypatch.setattr(mirrors.runner, "RETRY_S", 0.0, raising=False)  # no backoff wait
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2), table="bad")
    append(c, ids(1), table="good")
    obstacle = Path(location(settings, "bad")) / "_delta_log"
    obstacle.write_text("a plain file where the Delta log must go")

    async def go(services: Services) -> None:
        r = runner(services, "delta")
        with anyio.fail_after(10):
            await r.run_until_caught_up()
        assert mirror(local_lake, "bad")["delta"]["error"]
        assert mirror(local_lake, "good")["delta"]["error"] is None
        assert failed_tables(local_lake)["delta"] == 1
        stream = services.keys.stream(ORG, SUP)
        length = await services.redis.xlen(stream)

        obstacle.unlink()
        with anyio.fail_after(10):
            await r.run_until_caught_up()  # the same runner, nothing new in the stream
        assert await services.redis.xlen(stream) == length
        await r.release_all()

    with_services(settings, go)
    status = mirror(local_lake, "bad")["delta"]
    assert status["error"] is None and status["lag_versions"] == 0
    assert status["version"] == detail(c, "bad")["version"]
    assert failed_tables(local_lake)["delta"] == 0
    assert delta_ids(settings, "bad") == [0, 1]
    assert len(delta_commits(settings, "bad")) == 1


# -- 5. Iceberg snapshots expire by when they stopped being current --------------------


def test_iceberg_snapshots_expire_by_when_they_were_replaced(tmp_path: Path) -> None:
    # Pre-fix: expiry went by a snapshot's creation time: the snapshot created two hours
    # ago but current until the publish before last was expired (its manifest list
    # deleted) although a reader loaded it moments ago; that reader's scan failed.
    root = tmp_path / "lake"
    table_dir = root / "o" / "s" / "t"
    (table_dir / "data").mkdir(parents=True)
    schema = pl.DataFrame({"id": [0]}).to_arrow().schema

    def publish(version: int, current: str | None, retention_s: float) -> str:
        name = f"{version:032x}.parquet"
        pl.DataFrame({"id": [version]}).write_parquet(table_dir / "data" / name)
        size = (table_dir / "data" / name).stat().st_size
        files = [MirrorFile(f"o/s/t/data/{name}", "", 1, size, False)]  # an overwrite
        return iceberg.publish(
            {},
            ("o.s", "t"),
            str(table_dir),
            current,
            schema,
            files,
            lambda key: str(root / key),
            version=version,
            position=f"{version + 1}-0",
            incarnation="1-0",
            retention_s=retention_s,
        )

    def snapshots(metadata_location: str) -> list[int]:
        return [s.snapshot_id for s in iceberg.load({}, metadata_location).metadata.snapshots]

    def backdate(metadata_location: str, seconds: int) -> None:
        """The table was created ``seconds`` ago and left alone since."""
        path = Path(metadata_location.removeprefix("file://"))
        doc = json.loads(path.read_text())
        for entry in [*doc["snapshots"], *doc["snapshot-log"]]:
            entry["timestamp-ms"] -= seconds * 1000
        doc["last-updated-ms"] -= seconds * 1000
        path.write_text(json.dumps(doc))
        then = time.time() - seconds
        for avro in path.parent.glob("*.avro"):
            os.utime(avro, (then, then))

    m1 = publish(0, None, retention_s=60)
    backdate(m1, 2 * 3600)
    (s1,) = snapshots(m1)
    reader = iceberg.load({}, m1)  # a REST client loads the current pointer...
    m2 = publish(1, m1, retention_s=60)  # ... and two publishes land right after
    m3 = publish(2, m2, retention_s=60)
    s2, s3 = snapshots(m2)[-1], snapshots(m3)[-1]
    assert set(snapshots(m3)) == {s1, s2, s3}  # s1 replaced moments ago: kept
    assert reader.scan().to_arrow()["id"].to_pylist() == [0]

    # Replaced longer ago than the retention: gone, except the one the recorded pointer
    # (m3) shows, and the current one.
    m4 = publish(3, m3, retention_s=0)
    s4 = snapshots(m4)[-1]
    assert set(snapshots(m4)) == {s3, s4}  # s1 and s2 expired, s3 kept
    latest = iceberg.load({}, m4).scan().to_arrow()["id"].to_pylist()
    assert latest == [3]


# -- 6. a status of another incarnation is republished ---------------------------------


def test_a_status_of_another_incarnation_is_republished_at_start(local_lake: Lake) -> None:
    # Pre-fix: a runner start compared positions only, so a status recorded with another
    # incarnation (legacy: none) stayed as it was, and the table detail and the Iceberg
    # REST catalog (which skip such a status) hid the mirrors for good.
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2))
    local_lake.sync()
    assert rest_tables(local_lake) == [TBL]

    async def legacy(services: Services) -> None:
        for fmt in FORMATS:
            key = MirrorStatuses(services.redis, services.keys).key(ORG, SUP, fmt)
            status = msgspec.json.decode(await services.redis.hget(key, TBL), type=MirrorStatus)
            legacy = msgspec.structs.replace(status, incarnation="")
            await services.redis.hset(key, TBL, encode_status(legacy))

    with_services(settings, legacy)
    assert [m["version"] for m in mirror(local_lake).values()] == [None, None]
    assert rest_tables(local_lake) == []

    assert run_mirrors(settings) == {"delta": 1, "iceberg": 1}
    for m in mirror(local_lake).values():
        assert m["error"] is None and m["version"] == detail(c)["version"], m
    assert rest_tables(local_lake) == [TBL]
    loaded = ok(c.get(f"/iceberg/v1/namespaces/{ORG}.{SUP}/tables/{TBL}"))
    assert loaded["metadata-location"] == mirror(local_lake)["iceberg"]["metadata_location"]
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1]
    assert len(delta_commits(settings)) == 1  # the Delta log already had it


# -- 7. a failing mirror removal does not block the super ------------------------------


def test_a_failing_mirror_removal_does_not_block_the_super(
    local_lake: Lake, tmp_path: Path
) -> None:
    # Pre-fix: the removal's error escaped the runner's commit, so `lake.sync()` raised
    # and no other table of the super was published (on every run).
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(1), table="gone")
    append(c, ids(1), table="kept")
    local_lake.sync()
    # A real fault (as root, permissions would not stop an unlink): an entry of the log
    # that is a link out of the storage root, which LocalStorage refuses to delete.
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    escape = Path(location(settings, "gone")) / "_delta_log" / "zz-escape.json"
    escape.symlink_to(outside)
    ok(c.delete(table_url("gone")))
    append(c, ids(1, 1), table="kept")  # the drop and this in one runner batch

    local_lake.sync()
    for m in mirror(local_lake, "kept").values():
        assert m["error"] is None and m["version"] == detail(c, "kept")["version"], m
    assert delta_ids(settings, "kept") == iceberg_ids(local_lake, "kept") == [0, 1]
    assert failed_tables(local_lake) == {"delta": 1, "iceberg": 0}
    assert outside.exists()

    async def statuses(services: Services) -> dict[str, dict[str, MirrorStatus]]:
        found = MirrorStatuses(services.redis, services.keys)
        return {fmt: await found.of_super(ORG, SUP, fmt) for fmt in FORMATS}

    found = with_services(settings, statuses)
    assert "gone" not in found["iceberg"]
    assert "escapes the root" in (found["delta"]["gone"].error or "")

    # Fixed: the next runner start removes it.
    escape.unlink()
    local_lake.sync()
    assert failed_tables(local_lake) == {"delta": 0, "iceberg": 0}
    assert "gone" not in with_services(settings, statuses)["delta"]
    gone = Path(location(settings, "gone"))
    assert not [p for p in (gone / "_delta_log").rglob("*") if p.is_file()]
