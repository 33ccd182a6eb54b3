"""The mirror runners (``mirrors/runner.py``): what they publish, and that they resume
correctly whenever they are restarted, whatever state Redis and the mirrors are in.

Writes go through the real HTTP API; the runners are real ``MirrorRunner`` objects built
by ``Services.mirror_runners()`` and driven in burst mode (``run_until_caught_up``). The
mirrors are read back with deltalake and polars (an independent reader)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyiceberg.table import StaticTable

from app.ops.gc import collect_garbage
from app.services import Services
from app.settings import Settings
from mirrors.runner import MirrorRunner
from tests.support.lake import (
    ORG,
    SUP,
    TBL,
    append,
    delete_call,
    detail,
    events,
    ok,
    query,
    table_url,
    upsert,
)
from tests.support.mirror_lake import Lake, open_lake

T = TypeVar("T")
FORMATS = ("delta", "iceberg")


# -- helpers ---------------------------------------------------------------------------


def with_services(settings: Settings, fn: Callable[[Services], Awaitable[T]]) -> T:
    """Run ``fn`` in a fresh process-like context: new Services, new runner objects."""

    async def main() -> T:
        async with Services.open(settings) as services:
            return await fn(services)

    return anyio.run(main)


def runner(services: Services, fmt: str) -> MirrorRunner:
    return next(r for r in services.mirror_runners() if r.fmt == fmt)


async def drain(r: Any, timeout_s: float = 10) -> int:
    """Run one runner to completion (and let go of its leases), as ``worker --burst``."""
    with anyio.fail_after(timeout_s):  # a runner that never catches up fails, not hangs
        await r.run_until_caught_up()
    await r.release_all()
    return int(getattr(r, "published", 0))


def project_catalog(settings: Settings) -> None:
    with_services(settings, lambda s: drain(s.projector()))


def run_mirrors(
    settings: Settings, formats: tuple[str, ...] = FORMATS, timeout_s: float = 10
) -> dict[str, int]:
    """New mirror runners, run to completion; the number of publishes of each."""

    async def go(services: Services) -> dict[str, int]:
        return {fmt: await drain(runner(services, fmt), timeout_s) for fmt in formats}

    return with_services(settings, go)


def location(settings: Settings, table: str = TBL) -> str:
    if settings.storage_url:
        return f"{settings.storage_url}/{ORG}/{SUP}/{table}"
    return str(settings.data_dir / "files" / ORG / SUP / table)


def delta_options(settings: Settings) -> dict[str, str]:
    """How a Delta reader reaches the test's storage (from the settings alone)."""
    if not settings.storage_url:
        return {}
    assert settings.s3_endpoint_url and settings.s3_access_key_id
    assert settings.s3_secret_access_key
    return {
        "AWS_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.s3_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.s3_secret_access_key,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def iceberg_options(settings: Settings) -> dict[str, str]:
    if not settings.storage_url:
        return {}
    assert settings.s3_access_key_id and settings.s3_secret_access_key
    return {
        "s3.endpoint": str(settings.s3_endpoint_url),
        "s3.access-key-id": settings.s3_access_key_id,
        "s3.secret-access-key": settings.s3_secret_access_key,
        "s3.region": "us-east-1",
    }


def delta_table(settings: Settings, table: str = TBL) -> DeltaTable:
    return DeltaTable(location(settings, table), storage_options=delta_options(settings))


def delta_commits(settings: Settings, table: str = TBL) -> list[dict[str, Any]]:
    """Every commit of the table's Delta log, oldest first."""
    history = delta_table(settings, table).history()
    commits: list[dict[str, Any]] = sorted(history, key=lambda c: c["version"])
    return commits


def mirror_ids(lake: Lake, table: str = TBL) -> tuple[list[Any], list[Any]]:
    """The ``id`` column of the Delta and of the Iceberg mirror, sorted (either backend)."""
    settings = lake.settings
    in_delta = delta_table(settings, table).to_pyarrow_table(columns=["id"])
    meta = mirror(lake, table)["iceberg"]["metadata_location"]
    iceberg = StaticTable.from_metadata(meta, properties=iceberg_options(settings))
    in_iceberg = iceberg.scan(selected_fields=("id",)).to_arrow()
    return sorted(in_delta["id"].to_pylist()), sorted(in_iceberg["id"].to_pylist())


def positions(settings: Settings, table: str = TBL) -> list[str]:
    return [c["ledgerlake.position"] for c in delta_commits(settings, table)]


def delta_ids(settings: Settings, table: str = TBL) -> list[Any]:
    ids: list[Any] = pl.read_delta(location(settings, table))["id"].sort().to_list()
    return ids


def iceberg_ids(lake: Lake, table: str = TBL) -> list[Any]:
    meta = mirror(lake, table)["iceberg"]["metadata_location"]
    ids: list[Any] = pl.scan_iceberg(meta).collect()["id"].sort().to_list()
    return ids


def mirror(lake: Lake, table: str = TBL) -> dict[str, dict[str, Any]]:
    return {m["format"]: m for m in detail(lake.client, table)["mirrors"]}


def last_event_id(lake: Lake, table: str = TBL) -> str:
    return str(events(lake.client, table)[-1]["id"])


def status_keys(settings: Settings, fmt: str) -> list[str]:
    tag = f"{settings.redis_prefix}:{{{ORG}/{SUP}}}"
    return [f"{tag}:mirror:{fmt}", f"{tag}:ckpt:mirror-{fmt}"]


def forget(settings: Settings, formats: tuple[str, ...] = FORMATS) -> None:
    """Delete the mirror runners' status hash and checkpoint (a lost or restored Redis)."""

    async def go(services: Services) -> None:
        for fmt in formats:
            await services.redis.delete(*status_keys(settings, fmt))

    with_services(settings, go)


def ids(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "s": f"r{i}"} for i in range(start, start + n)]


# -- resuming -----------------------------------------------------------------------------


def test_new_runners_resume_where_the_old_ones_stopped(local_lake: Lake) -> None:
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2))
    local_lake.sync()
    assert positions(settings) == [last_event_id(local_lake)]

    append(c, ids(1, 2))
    append(c, ids(1, 3))
    append(c, ids(1, 100), table="other")
    project_catalog(settings)
    assert run_mirrors(settings) == {"delta": 2, "iceberg": 2}  # orders and other, once
    # Latest-only: one commit for the two appends the runner found.
    assert positions(settings) == [events(c)[1]["id"], last_event_id(local_lake)]
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1, 2, 3]
    assert delta_ids(settings, "other") == [100]

    # Nothing new: new runners publish nothing and commit nothing.
    assert run_mirrors(settings) == {"delta": 0, "iceberg": 0}
    assert len(delta_commits(settings)) == 2
    meta = mirror(local_lake)["iceberg"]["metadata_location"]
    assert mirror(local_lake)["iceberg"]["version"] == 3
    run_mirrors(settings)
    assert mirror(local_lake)["iceberg"]["metadata_location"] == meta


def test_mirror_runners_ahead_of_the_catalog_snapshot(local_lake: Lake) -> None:
    """The catalog projection never ran: each mirror runner folds the log itself, and a
    new one starts from an empty snapshot behind its own checkpoint."""
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2))
    assert run_mirrors(settings) == {"delta": 1, "iceberg": 1}
    append(c, ids(2, 2))
    assert run_mirrors(settings) == {"delta": 1, "iceberg": 1}
    assert len(delta_commits(settings)) == 2
    assert positions(settings)[-1] == last_event_id(local_lake)
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1, 2, 3]

    project_catalog(settings)
    assert run_mirrors(settings) == {"delta": 0, "iceberg": 0}
    append(c, ids(1, 4))
    assert run_mirrors(settings) == {"delta": 1, "iceberg": 1}
    assert len(delta_commits(settings)) == 3
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1, 2, 3, 4]


def test_catalog_snapshot_ahead_of_the_mirror_checkpoint(local_lake: Lake) -> None:
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(1))
    local_lake.sync()
    append(c, ids(1, 1))
    append(c, ids(1, 2), table="other")
    project_catalog(settings)  # the snapshot is past what the mirrors published
    assert run_mirrors(settings) == {"delta": 2, "iceberg": 2}
    assert positions(settings) == [events(c)[1]["id"], last_event_id(local_lake)]
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1]
    assert delta_ids(settings, "other") == [2]
    assert run_mirrors(settings) == {"delta": 0, "iceberg": 0}
    for m in mirror(local_lake).values():
        assert m["version"] == 2 and m["lag_versions"] == 0


def test_lost_status_and_checkpoint_make_no_duplicate(lake: Lake) -> None:
    """On local disk and on S3."""
    c, settings = lake.client, lake.settings
    append(c, ids(2))
    append(c, ids(2, 2))
    lake.sync()
    commits = delta_commits(settings)
    assert len(commits) == 1

    forget(settings)
    assert [m["version"] for m in mirror(lake).values()] == [None, None]
    lake.sync()
    assert delta_commits(settings) == commits  # the Delta log already had it
    assert mirror_ids(lake) == ([0, 1, 2, 3], [0, 1, 2, 3])
    for m in mirror(lake).values():
        assert m["version"] == 2 and m["lag_versions"] == 0 and m["error"] is None
    for lag in ok(c.get("/health"))["projections"].values():
        assert lag["lag_events"] == 0

    append(c, ids(1, 4))
    lake.sync()
    assert len(delta_commits(settings)) == 2
    assert delta_commits(settings)[-1]["ledgerlake.position"] == last_event_id(lake)
    assert mirror_ids(lake) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])


def test_lost_checkpoint_while_the_catalog_snapshot_is_behind(local_lake: Lake) -> None:
    # Regression: a runner whose checkpoint key is gone used to start from a catalog
    # snapshot behind what the group had already delivered and loop forever (nothing to
    # read, nothing pending, yet behind). It now folds up to the group's last delivered
    # entry, and publishes without a duplicate commit.
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2))
    assert run_mirrors(settings) == {"delta": 1, "iceberg": 1}  # no catalog projection yet
    forget(settings)
    run_mirrors(settings, timeout_s=5)  # fails (times out) here
    assert len(delta_commits(settings)) == 1
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1]
    assert [m["version"] for m in mirror(local_lake).values()] == [1, 1]


def test_small_batches_publish_every_version_once(local_mirror_settings: Settings) -> None:
    """With one event per runner batch, each version is its own mirror commit."""
    settings = msgspec.structs.replace(local_mirror_settings, projection_batch=1)
    with contextlib.contextmanager(open_lake)(settings) as lake:
        for i in range(3):
            append(lake.client, ids(1, i))
        assert run_mirrors(settings) == {"delta": 4, "iceberg": 4}  # versions 0 to 3
        assert positions(settings) == [e["id"] for e in events(lake.client)]
        assert [c["ledgerlake.version"] for c in delta_commits(settings)] == ["0", "1", "2", "3"]
        assert run_mirrors(settings) == {"delta": 0, "iceberg": 0}
        assert mirror_ids(lake) == ([0, 1, 2], [0, 1, 2])


def test_status_and_checkpoint_behind_the_mirrors(local_lake: Lake) -> None:
    """Redis says the mirrors are older than they are (the runner's Redis step after a
    mirror commit was lost): the mirror's own ``ledgerlake.position`` prevents a second
    commit of the same change."""
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2))
    local_lake.sync()

    async def save(services: Services) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fmt in FORMATS:
            status, ckpt = status_keys(settings, fmt)
            out[status] = await services.redis.hgetall(status)
            out[ckpt] = await services.redis.get(ckpt)
        return out

    async def restore(services: Services) -> None:
        for key, value in saved.items():
            if isinstance(value, dict):
                await services.redis.hset(key, mapping=value)
            else:
                await services.redis.set(key, value)

    saved = with_services(settings, save)
    append(c, ids(2, 2))
    local_lake.sync()
    assert len(delta_commits(settings)) == 2
    with_services(settings, restore)
    assert [m["version"] for m in mirror(local_lake).values()] == [1, 1]

    local_lake.sync()
    assert len(delta_commits(settings)) == 2
    assert positions(settings)[-1] == last_event_id(local_lake)
    assert delta_ids(settings) == iceberg_ids(local_lake) == [0, 1, 2, 3]
    assert [m["version"] for m in mirror(local_lake).values()] == [2, 2]


def test_parallel_runners_of_one_format_publish_each_change_once(local_lake: Lake) -> None:
    c, settings = local_lake.client, local_lake.settings
    tables = [("sales", "a"), ("sales", "b"), ("ops", "c"), ("ops", "d")]
    for sup, table in tables:
        ok(c.post(f"/v1/{ORG}/{sup}/tables/{table}/rows", json=ids(2)))

    def parallel() -> list[int]:
        async def go(one: Services) -> list[int]:
            async with Services.open(settings) as two:
                # Four Delta runners and two Iceberg runners, on two connections.
                runners = [runner(s, "delta") for s in (one, two, one, two)]
                runners += [runner(s, "iceberg") for s in (one, two)]
                counts = [0] * len(runners)

                async def run(i: int) -> None:
                    counts[i] = await drain(runners[i])

                async with anyio.create_task_group() as tg:
                    for i in range(len(runners)):
                        tg.start_soon(run, i)
                return counts

        return with_services(settings, go)

    def commits(sup: str, table: str) -> list[str]:
        path = settings.data_dir / "files" / ORG / sup / table
        history = DeltaTable(str(path)).history()
        return sorted(str(h["ledgerlake.position"]) for h in history)

    counts = parallel()
    assert sum(counts[:4]) == 4 and sum(counts[4:]) == 4  # each table once per format
    first = {t: commits(*t) for t in tables}
    assert all(len(p) == 1 for p in first.values())

    for sup, table in tables:
        ok(c.post(f"/v1/{ORG}/{sup}/tables/{table}/rows", json=ids(1, 2)))
    counts = parallel()
    assert sum(counts[:4]) == 4 and sum(counts[4:]) == 4
    for t in tables:
        positions_now = commits(*t)
        assert len(positions_now) == 2 and len(set(positions_now)) == 2
        path = settings.data_dir / "files" / ORG / t[0] / t[1]
        assert pl.read_delta(str(path))["id"].sort().to_list() == [0, 1, 2]


# -- a failing table ----------------------------------------------------------------------


def test_a_failing_table_does_not_block_the_others(local_lake: Lake) -> None:
    c, settings = local_lake.client, local_lake.settings
    append(c, ids(2), table="bad")
    append(c, ids(3), table="good")
    # A real fault: a plain file where each format's metadata directory must go.
    bad = Path(location(settings, "bad"))
    (bad / "_delta_log").write_text("not a directory")
    (bad / "metadata").write_text("not a directory")
    local_lake.sync()

    for m in mirror(local_lake, "bad").values():
        assert m["error"], m
        assert m["version"] is None and m["lag_versions"] == 2
    for m in mirror(local_lake, "good").values():
        assert m["error"] is None and m["version"] == 1
    assert delta_ids(settings, "good") == iceberg_ids(local_lake, "good") == [0, 1, 2]
    lags = ok(c.get("/health"))["projections"]
    assert all(lag["lag_events"] == 0 for lag in lags.values())
    # The checkpoint moved on, so the failure shows as failed tables, not as lag.
    assert lags["mirror-delta"]["failed_tables"] == lags["mirror-iceberg"]["failed_tables"] == 1
    assert 'ledgerlake_mirror_failed_tables{projection="mirror-delta"} 1' in c.get("/metrics").text

    # It keeps failing; the other table keeps being published.
    append(c, ids(1, 3), table="good")
    append(c, ids(1, 2), table="bad")
    local_lake.sync()
    assert delta_ids(settings, "good") == [0, 1, 2, 3]
    assert all(m["error"] for m in mirror(local_lake, "bad").values())

    # Fixed: a runner start retries it, without any new write.
    (bad / "_delta_log").unlink()
    (bad / "metadata").unlink()
    local_lake.sync()
    for m in mirror(local_lake, "bad").values():
        assert m["error"] is None and m["version"] == 2 and m["lag_versions"] == 0
    assert delta_ids(settings, "bad") == iceberg_ids(local_lake, "bad") == [0, 1, 2]
    assert len(delta_commits(settings, "bad")) == 1


# -- what the mirrors hold ----------------------------------------------------------------


@pytest.fixture
def inline_lake(local_mirror_settings: Settings) -> Iterator[Lake]:
    """Small writes inlined into their events: the mirrors must copy those batches."""
    yield from open_lake(msgspec.structs.replace(local_mirror_settings, inline_max_rows=100))


def test_mirrors_follow_every_kind_of_change(inline_lake: Lake) -> None:
    lake = inline_lake
    c, settings = lake.client, lake.settings

    def check() -> None:
        lake.sync()
        table = detail(c)
        names = [col["name"] for col in table["columns"]]
        expected = query(c, f"select {', '.join(names)} from {TBL} order by id")
        for m in mirror(lake).values():
            assert m["version"] == table["version"] and m["error"] is None
        got_delta = pl.read_delta(location(settings)).sort("id")
        meta = mirror(lake)["iceberg"]["metadata_location"]
        got_iceberg = pl.scan_iceberg(meta).collect().sort("id")
        for got in (got_delta, got_iceberg):
            assert got.columns == names
            assert [list(r) for r in got.rows()] == expected

    append(c, ids(3))  # inlined
    check()
    append(c, [{"id": 3, "s": "r3", "x": 0.5}])  # a new column
    check()
    upsert(c, [{"id": 1, "s": "changed", "x": 1.5}, {"id": 9, "s": "r9"}])
    check()
    ok(delete_call(c, {"where": "id = 0"}))
    check()
    ok(c.post(table_url(suffix="/compact")))
    check()
    ok(c.post(table_url(suffix="/rows"), params={"mode": "overwrite"}, json=ids(120, 50)))
    check()
    ok(c.post(table_url(suffix="/restore"), json={"version": 3}))
    check()


def test_a_column_that_comes_back_with_another_type(local_lake: Lake) -> None:
    # Regression: Delta cannot drop a column, so after a restore to a schema without `x`
    # the Delta schema keeps `x double`. When `x` came back as a string, the mirror
    # committed string files under a double schema (unreadable, reported as fine). The
    # Delta table is now created again when a column's type changes.
    c, settings = local_lake.client, local_lake.settings
    append(c, [{"id": 1, "s": "a"}])
    append(c, [{"id": 2, "s": "b", "x": 0.5}])
    local_lake.sync()
    ok(c.post(table_url(suffix="/restore"), json={"version": 1}))
    append(c, [{"id": 3, "s": "c", "x": "text"}])
    assert query(c, f"select id, x from {TBL} order by id") == [[1, None], [3, "text"]]
    local_lake.sync()
    status = mirror(local_lake)
    meta = status["iceberg"]["metadata_location"]
    iceberg = pl.scan_iceberg(meta).collect().sort("id").select("id", "x").rows()
    assert iceberg == [(1, None), (3, "text")]
    assert status["delta"]["error"] is None and status["delta"]["version"] == 6
    delta = pl.read_delta(location(settings)).sort("id").select("id", "x").rows()
    assert delta == [(1, None), (3, "text")]


def test_types_the_formats_lack_are_copied(local_lake: Lake) -> None:
    c, settings = local_lake.client, local_lake.settings
    batch = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "u": pa.array([2**63, 7], pa.uint64()),
            "small": pa.array([250, 1], pa.uint8()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_table(batch)
    r = c.post(
        table_url(suffix="/rows"),
        content=sink.getvalue().to_pybytes(),
        headers={"content-type": "application/vnd.apache.arrow.stream"},
    )
    ok(r)
    local_lake.sync()
    got = pl.read_delta(location(settings)).sort("id")
    assert got["small"].to_list() == [250, 1]
    assert [int(v) for v in got["u"].to_list()] == [2**63, 7]
    meta = mirror(local_lake)["iceberg"]["metadata_location"]
    ice = pl.scan_iceberg(meta).collect().sort("id")
    assert ice["small"].to_list() == [250, 1]
    assert [int(v) for v in ice["u"].to_list()] == [2**63, 7]


def test_a_format_turned_off_and_on_under_one_long_lived_runner(inline_lake: Lake) -> None:
    # Regression: the publisher caches the copies it made; turning a format off deleted
    # the copies but kept the cache, so turning it on again under the same runner (as in
    # `serve`) committed over files that no longer existed. `remove` now forgets them.
    lake = inline_lake
    c, settings = lake.client, lake.settings
    append(c, ids(2))  # inlined: each format has a copy of the batch

    async def go(services: Services) -> None:
        projector = services.projector()
        runners = services.mirror_runners()

        async def catch_up() -> None:
            for r in [projector, *runners]:
                with anyio.fail_after(10):
                    await r.run_until_caught_up()

        await catch_up()
        ok(c.put(table_url(suffix="/mirrors"), json={"formats": []}))
        await catch_up()
        assert not list((Path(location(settings)) / "mirror").rglob("*.parquet"))
        ok(c.put(table_url(suffix="/mirrors"), json={"formats": list(FORMATS)}))
        await catch_up()
        for r in [projector, *runners]:
            await r.release_all()

    with_services(settings, go)
    for m in mirror(lake).values():
        assert m["error"] is None and m["version"] == 3, m
    assert delta_ids(settings) == iceberg_ids(lake) == [0, 1]


def test_gc_removes_the_mirror_copies_of_a_dropped_table(inline_lake: Lake) -> None:
    """Inlined batches are copied into ``<table>/mirror/<format>/``; once the table is
    dropped those copies are garbage, like its data files."""
    lake = inline_lake
    c, settings = lake.client, lake.settings
    append(c, ids(2))
    lake.sync()
    copies = Path(location(settings)) / "mirror"
    old = {p for p in copies.rglob("*.parquet")}
    assert len(old) == 2  # one per format
    ok(c.delete(table_url()))
    append(c, [{"id": 7, "s": "new"}])  # the drop and the new table in one runner batch
    lake.sync()
    assert delta_ids(settings) == iceberg_ids(lake) == [7]

    async def gc(services: Services) -> Any:
        return await collect_garbage(
            services.log,
            services.reader,
            services.storage,
            grace=timedelta(hours=1),
            dry_run=False,
            now=datetime.now(UTC) + timedelta(hours=2),
        )

    with_services(settings, gc)
    left = {p for p in copies.rglob("*.parquet")}
    assert len(left) == 2 and not (old & left)  # only the new table's copies remain
    assert delta_ids(settings) == iceberg_ids(lake) == [7]


def test_iceberg_appends_do_not_list_the_current_files_again(
    local_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 9): every Iceberg publish listed the current snapshot's files
    by reading every manifest (one more per commit), most of its time after a few
    hundred versions. A runner now remembers what it published; it lists the files only
    when it does not know the snapshot (a new process) or when files were removed."""
    from pyiceberg.table import DataScan

    import mirrors.iceberg as iceberg

    listings: list[int] = []
    original = DataScan.plan_files

    def counting(self: Any) -> Any:
        listings.append(1)
        return original(self)

    monkeypatch.setattr(DataScan, "plan_files", counting)
    c = local_lake.client
    append(c, ids(2))
    local_lake.sync()
    first = len(listings)
    for n in range(3):
        append(c, ids(1, 10 + n))
        local_lake.sync()  # the same process's runner: it knows the snapshot
    assert iceberg_ids(local_lake) == [0, 1, 10, 11, 12]
    assert len(listings) - first <= 1  # (the test's own reader scans once)
    # Only the newest snapshot of the table is remembered (a hot table of 10,000 files
    # would otherwise fill the cache with near-identical sets).
    here = [
        loc for loc in iceberg._PUBLISHED.paths if loc.startswith(location(local_lake.settings))
    ]
    assert len(here) == 1
    iceberg._PUBLISHED.paths.clear()  # a new process
    append(c, ids(1, 20))
    before = len(listings)
    local_lake.sync()
    assert len(listings) > before  # unknown snapshot: listed
    delete_call(c, {"keys": {"id": [10]}})
    local_lake.sync()
    assert iceberg_ids(local_lake) == [0, 1, 11, 12, 20]
