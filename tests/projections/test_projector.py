"""The projection runner on a real Redis: burst mode, leases, takeover, exactly-once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from app.services import Services
from app.settings import Settings
from app.write.request import IngestRequest
from events.model import DataFile, DataType, Field, RowsAppended, TableCreated
from mirrors.runner import IDLE_COMMIT_DELAY_S, PUBLISH_DELAY_S
from projections.replay import rebuild_super
from projections.runner import CatalogProjector
from projections.store import CATALOG, CommitOutcome, encode_table

pytestmark = pytest.mark.anyio


async def write(
    services: Services, tmp: Path, table: str, rows: list[dict], sup: str = "s"
) -> None:
    src = tmp / f"{table}-{len(rows)}-{id(rows)}.json"
    src.write_text(json.dumps(rows))
    await services.writer.ingest(IngestRequest("o", sup, table, src, "json"))


async def assert_snapshot_is_fold_of_log(services: Services, sup: str = "s") -> None:
    stored = await services.store.load_super("o", sup)
    rebuilt, _ = await rebuild_super(services.log, "o", sup)
    assert stored.position == rebuilt.position
    assert {k: encode_table(v) for k, v in stored.tables.items()} == {
        k: encode_table(v) for k, v in rebuilt.tables.items()
    }


async def pending(services: Services, sup: str = "s") -> int:
    info = await services.redis.xpending(services.keys.stream("o", sup), CATALOG)
    return int(info["pending"])


async def test_burst_mode_projects_everything_and_acks(services: Services, tmp_path: Path) -> None:
    for i in range(5):
        await write(services, tmp_path, "t", [{"x": i}])
    await write(services, tmp_path, "u", [{"y": "a"}])
    projector = services.projector()
    applied = await projector.run_until_caught_up()
    # registry: OrgCreated + SuperCreated; t: TableCreated + 5 appends; u: 2 events
    assert applied == 2 + 6 + 2
    await assert_snapshot_is_fold_of_log(services)
    assert await pending(services) == 0
    assert await projector.run_until_caught_up() == 0  # nothing left


async def test_a_second_runner_waits_for_the_lease(services: Services, tmp_path: Path) -> None:
    await write(services, tmp_path, "t", [{"x": 1}])
    a, b = services.projector(), services.projector()
    assert await a.run_until_caught_up() == 4  # 2 registry + 2 table events
    await write(services, tmp_path, "t", [{"x": 2}])
    assert await b.run_until_caught_up() == 0  # a holds the leases
    await a.release_all()
    assert await b.run_until_caught_up() == 1
    await assert_snapshot_is_fold_of_log(services)


async def test_takeover_claims_what_a_dead_runner_left_pending(
    services: Services, tmp_path: Path
) -> None:
    for i in range(3):
        await write(services, tmp_path, "t", [{"x": i}])
    first = services.projector()
    await first.run_until_caught_up()
    for i in range(3):
        await write(services, tmp_path, "t", [{"x": 10 + i}])
    stream = services.keys.stream("o", "s")
    # A runner that read the new entries and died before committing: they sit in its
    # pending list, unacknowledged, and its lease is gone.
    delivered = await services.redis.xreadgroup(CATALOG, "dead", {stream: ">"}, count=100)
    assert len(delivered[0][1]) == 3
    await first.release_all()
    heir = services.projector()
    assert await heir.run_until_caught_up() == 3
    await assert_snapshot_is_fold_of_log(services)
    assert await pending(services) == 0


async def test_redelivered_entries_are_not_applied_twice(
    services: Services, tmp_path: Path
) -> None:
    for i in range(4):
        await write(services, tmp_path, "t", [{"x": i}])
    runner = services.projector()
    await runner.run_until_caught_up()
    await runner.release_all()
    before = await services.store.load_super("o", "s")
    # Rewind the consumer group: every entry is delivered again.
    await services.redis.xgroup_setid(services.keys.stream("o", "s"), CATALOG, "0")
    again = services.projector()
    assert await again.run_until_caught_up() == 0
    after = await services.store.load_super("o", "s")
    assert len(after.tables["t"].files) == 4
    assert encode_table(after.tables["t"]) == encode_table(before.tables["t"])


async def test_a_stale_commit_writes_nothing(services: Services, tmp_path: Path) -> None:
    await write(services, tmp_path, "t", [{"x": 1}])
    await services.projector().run_until_caught_up()
    stored = await services.store.load_super("o", "s")
    bogus = msgspec.structs.replace(stored, position="99999999999999-0", tables={})
    outcome = await services.store.commit_super(bogus, expected="1-0", changed=[], removed=["t"])
    assert outcome is CommitOutcome.MOVED
    assert (await services.store.load_super("o", "s")).tables.keys() == {"t"}


async def test_runners_project_many_supers(services: Services, tmp_path: Path) -> None:
    for sup in ("s", "s2", "s3"):
        await write(services, tmp_path, "t", [{"x": 1}], sup=sup)
    projector: CatalogProjector = services.projector()
    await projector.run_until_caught_up()
    for sup in ("s", "s2", "s3"):
        await assert_snapshot_is_fold_of_log(services, sup)
    registry = await services.store.load_registry()
    assert sorted(registry.orgs["o"].supers) == ["s", "s2", "s3"]


async def test_overlapping_runners_never_lose_or_repeat_events(
    services: Services, tmp_path: Path
) -> None:
    """A runner whose lease lapsed (a long pause) keeps working on stale state while
    another takes over and the consumer group splits entries between them."""
    await write(services, tmp_path, "t", [{"x": 1}])
    a = CatalogProjector(services.redis, services.keys, services.store, consumer="A", batch=2)
    b = CatalogProjector(services.redis, services.keys, services.store, consumer="B", batch=2)
    await a.run_until_caught_up()
    # A's leases lapse (what the TTL does during a long pause); B takes the units over.
    for key in await services.redis.keys(f"{services.keys.prefix}:*:lease:*"):
        await services.redis.delete(key)
    await b._cycle(block=False)
    for x in (2, 3, 4, 5):
        await write(services, tmp_path, "t", [{"x": x}])
    unit_a, unit_b = a.units["o/s"], b.units["o/s"]
    stale_batch = await a._read(unit_a, ">")  # A, unaware, takes versions 2 and 3
    await b._step(unit_b)  # B gets versions 4 and 5: a gap it must not commit over
    await a._apply(unit_a, stale_batch)  # A's commit must be refused
    await b.run_until_caught_up()
    await a.run_until_caught_up()
    await assert_snapshot_is_fold_of_log(services)
    assert (await services.store.load_super("o", "s")).tables["t"].row_count == 5
    assert await pending(services) == 0


async def test_an_idle_runner_waits_instead_of_spinning(services: Services, tmp_path: Path) -> None:
    await write(services, tmp_path, "t", [{"x": 1}])
    holder = services.projector()
    await holder.run_until_caught_up()

    class Counting(CatalogProjector):
        cycles = 0

        async def _cycle(self, *, block: bool) -> bool:
            Counting.cycles += 1
            return await super()._cycle(block=block)

    idle = Counting(services.redis, services.keys, services.store, block_ms=100)
    with anyio.move_on_after(0.5):
        await idle.run(anyio.Event())
    assert idle.units == {}  # it holds nothing: the other runner has every lease
    assert 1 <= Counting.cycles <= 20  # blocked ~100 ms per cycle; spinning would be 1000s


async def test_a_commit_can_acknowledge_thousands_of_entries(services: Services) -> None:
    """More acks than Lua's unpack() takes in one call."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    base = {"org": "o", "super_": "s", "table": "t", "actor": "me", "time": t0}
    await services.writer.register("o", "s", "anonymous", "")
    events: list[Any] = [
        TableCreated(version=0, columns=(Field("x", DataType(kind="int64")),), **base)
    ]
    events += [
        RowsAppended(
            version=i, files=(DataFile(path=f"f{i}", rows=1, size_bytes=1),), rows=1, **base
        )
        for i in range(1, 9001)
    ]
    await services.log.append("o", "s", "t", events, expected_version=-1)
    runner = CatalogProjector(services.redis, services.keys, services.store, batch=10_000)
    assert await runner.run_until_caught_up() == 9001 + 2
    assert (await services.store.load_super("o", "s")).tables["t"].version == 9000
    assert await pending(services) == 0


async def test_entries_left_pending_by_another_consumer_are_claimed(
    services: Services, tmp_path: Path
) -> None:
    """A consumer (a runner whose lease lapsed, or a read whose reply was lost) took an
    entry and vanished: the lease holder must claim it rather than wait forever."""
    await write(services, tmp_path, "t", [{"x": 1}])
    runner = services.projector()
    await runner.run_until_caught_up()
    await write(services, tmp_path, "t", [{"x": 2}])
    stream = services.keys.stream("o", "s")
    await services.redis.xreadgroup(CATALOG, "vanished", {stream: ">"}, count=10)
    assert await runner.run_until_caught_up() == 1
    assert (await services.store.load_super("o", "s")).tables["t"].version == 2
    assert await pending(services) == 0


async def test_while_running_the_projector_commits_many_events_in_one_snapshot_write(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9): every event used to be a snapshot commit, which rewrites
    each changed table (2 MB for a table of 10,000 files). While running, folded events
    wait up to ``commit_delay_s`` and are committed together; a burst (no blocking) and
    a shutdown commit what is staged at once."""
    await write(services, tmp_path, "t", [{"x": 0}])
    projector = CatalogProjector(services.redis, services.keys, services.store, commit_delay_s=3600)
    await projector.run_until_caught_up()  # a burst commits at once, delay or not
    await assert_snapshot_is_fold_of_log(services)
    commits: list[int] = []
    original = services.store.commit_super

    async def counting(*args: Any, **kwargs: Any) -> CommitOutcome:
        commits.append(kwargs["folded"])
        return await original(*args, **kwargs)

    monkeypatch.setattr(services.store, "commit_super", counting)
    committed = (await services.store.load_super("o", "s")).position
    for i in range(1, 4):
        await write(services, tmp_path, "t", [{"x": i}])
        assert await projector._cycle(block=True)  # folded and staged, not committed
    assert commits == []
    assert (await services.store.load_super("o", "s")).position == committed
    assert await pending(services) == 3  # not acknowledged before the commit
    stop = anyio.Event()
    stop.set()
    await projector.run(stop)  # shutting down commits what is staged
    assert commits == [3]
    await assert_snapshot_is_fold_of_log(services)
    assert (await services.store.load_super("o", "s")).tables["t"].row_count == 4
    assert await pending(services) == 0


async def test_a_staged_commit_is_made_once_its_delay_has_passed(
    services: Services, tmp_path: Path
) -> None:
    await write(services, tmp_path, "t", [{"x": 0}])
    projector = CatalogProjector(services.redis, services.keys, services.store, commit_delay_s=60)
    await projector.run_until_caught_up()
    await write(services, tmp_path, "t", [{"x": 1}])
    assert await projector._cycle(block=True)
    unit = projector.units["o/s"]
    assert unit.staged is not None and unit.staged.folded == 1
    unit.staged.since -= 60  # as if the delay had passed
    await projector._cycle(block=True)
    assert unit.staged is None
    await assert_snapshot_is_fold_of_log(services)


async def test_leases_are_renewed_a_third_of_the_way_not_every_cycle(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9): every cycle renewed every lease, a write that Redis
    fsyncs, several times per event."""
    await write(services, tmp_path, "t", [{"x": 0}])
    projector = CatalogProjector(services.redis, services.keys, services.store, lease_ms=30_000)
    await projector.run_until_caught_up()
    renewed: list[str] = []
    original = projector._renew

    async def counting(*, keys: list[str], args: list[Any]) -> Any:
        renewed.append(keys[0])
        return await original(keys=keys, args=args)

    monkeypatch.setattr(projector, "_renew", counting)
    for i in range(1, 4):
        await write(services, tmp_path, "t", [{"x": i}])
        await projector.run_until_caught_up()
    assert renewed == []
    unit = projector.units["o/s"]
    unit.renewed_at -= 10.1  # a third of the lease has passed
    await projector.run_until_caught_up()
    assert renewed == [unit.lease]
    assert 25_000 < await services.redis.pttl(unit.lease) <= 30_000


async def _mirror_checkpoint(services: Services, fmt: str) -> str:
    raw = await services.redis.get(services.keys.checkpoint("o", "s", f"mirror-{fmt}"))
    return raw.decode() if raw else "0-0"


async def _last_id(services: Services) -> str:
    (entry,) = await services.redis.xrevrange(services.keys.stream("o", "s"), count=1)
    return str(entry[0].decode())


@pytest.mark.parametrize("mirrored", [False, True])
async def test_a_mirror_runner_gathers_events_before_it_publishes(
    settings: Settings, tmp_path: Path, mirrored: bool
) -> None:
    """Regression (issue 9): a mirror runner made a Delta or Iceberg commit per write,
    and a Redis write per event even for tables without its format (the default with
    LEDGERLAKE_MIRRORS=none). Events now gather for PUBLISH_DELAY_S before a publish
    (mirrors are latest-only), and IDLE_COMMIT_DELAY_S when they publish nothing; a
    burst (no blocking) still commits at once."""
    settings = msgspec.structs.replace(settings, mirrors="delta" if mirrored else "none")
    async with Services.open(settings) as services:
        await write(services, tmp_path, "t", [{"x": 0}])
        runner = next(r for r in services.mirror_runners() if r.fmt == "delta")
        await runner.run_until_caught_up()
        assert await _mirror_checkpoint(services, "delta") == await _last_id(services)
        published = runner.published
        assert published == (1 if mirrored else 0)
        for i in (1, 2):
            await write(services, tmp_path, "t", [{"x": i}])
            assert await runner._cycle(block=True)
        unit = runner.units["o/s"]
        assert unit.staged is not None and unit.staged.folded == 2
        delay = PUBLISH_DELAY_S if mirrored else IDLE_COMMIT_DELAY_S
        assert runner._commit_delay(unit.staged) == delay
        assert await _mirror_checkpoint(services, "delta") != await _last_id(services)
        assert runner.published == published
        unit.staged.since -= delay  # as if the delay had passed
        await runner._cycle(block=True)
        assert unit.staged is None
        assert await _mirror_checkpoint(services, "delta") == await _last_id(services)
        assert runner.published == published + (1 if mirrored else 0)  # one for both
        await runner.release_all()


async def test_a_runner_behind_by_a_full_batch_does_not_wait_to_gather(
    services: Services, tmp_path: Path
) -> None:
    """Regression (review): while one super had a commit staged, the runner slept until
    it was due after every cycle, even one that read a full batch of another super:
    catch-up after an outage went at one batch per delay."""
    await write(services, tmp_path, "t", [{"x": 0}], sup="a")
    await write(services, tmp_path, "t", [{"x": 0}], sup="b")
    projector = CatalogProjector(
        services.redis, services.keys, services.store, batch=2, commit_delay_s=3600
    )
    await projector.run_until_caught_up()
    await write(services, tmp_path, "t", [{"x": 1}], sup="a")  # staged, due in an hour
    for i in range(1, 5):
        await write(services, tmp_path, "t", [{"x": i}], sup="b")  # a backlog of b
    projector._stopping = anyio.Event()  # as while running (never set here)
    with anyio.fail_after(10):  # it would sleep for an hour if it gathered
        assert await projector._cycle(block=True)  # a: 1 (staged), b: 2 of 4
        assert await projector._cycle(block=True)  # b: the other 2
    assert projector.units["o/a"].staged is not None
    await assert_snapshot_is_fold_of_log(services, "b")
