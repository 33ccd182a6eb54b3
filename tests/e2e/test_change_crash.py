"""``kill -9`` of a process in the middle of an upsert or delete: after it published
the change's new-rows file, before it appended the event that records the file and its
deletion vectors. Nothing acknowledged is lost and nothing of the change is visible:
the table is at the version it was, reads the rows it had, the file is an orphan that
``gc`` collects, and the next change of the table works."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from app.ops.gc import collect_garbage
from app.services import Services
from app.settings import Settings
from app.write.bodies import open_source
from app.write.changes.commit import Target
from app.write.request import IngestRequest

pytestmark = pytest.mark.anyio

ORG, SUP, T = "acme", "sales", "orders"
ROOT = Path(__file__).resolve().parents[2]

# Runs in the doomed process: the same change the test asks for, with the event log's
# append replaced by SIGKILL to itself (so the process dies exactly between publishing
# the change's file and appending its event; nothing is cleaned up on the way out).
DOOMED = """
import json, os, signal, sys
from pathlib import Path
import anyio
from app.services import Services
from app.settings import Settings
from app.write.bodies import open_source
from app.write.changes.commit import Target

async def main() -> None:
    op, body = sys.argv[1], sys.argv[2]
    settings = Settings.from_env(os.environ)
    async with Services.open(settings, settings.redis_url) as services:
        async def die(*args, **kwargs):
            print("published", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        services.log.append = die
        target = Target("acme", "sales", "orders")
        if op == "upsert":
            source = open_source(Path(body), "json", {})
            await services.mutator.upsert(target, source, ["id"])
        else:
            await services.mutator.delete(target, keys={"id": json.loads(open(body).read())})

anyio.run(main)
"""


def env_of(settings: Settings) -> dict[str, str]:
    assert settings.redis_url
    return {
        "LEDGERLAKE_DATA_DIR": str(settings.data_dir),
        "LEDGERLAKE_REDIS_URL": settings.redis_url,
        "LEDGERLAKE_REDIS_PREFIX": settings.redis_prefix,
        "LEDGERLAKE_INLINE_MAX_ROWS": "0",
        "LEDGERLAKE_MIRRORS": "none",
        "LEDGERLAKE_ARCHIVE": "false",
        "PATH": "/usr/bin:/bin",
    }


async def rows(services: Services) -> list[tuple[int, int]]:
    state = await services.reader.super_state(ORG, SUP)
    result = await services.engine.run(state, f"select id, v from {T} order by id", limit=10_000)
    return [(int(r["id"]), int(r["v"])) for r in result.table.to_pylist()]


@pytest.mark.parametrize("op", ["upsert", "delete"])
async def test_kill_9_between_the_changes_file_and_its_event_loses_and_shows_nothing(
    settings: Settings, tmp_path: Path, op: str
) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps([{"id": i, "v": 0} for i in range(300)]))
    async with Services.open(settings, settings.redis_url) as services:
        await services.writer.ingest(IngestRequest(ORG, SUP, T, seed, "json"))
        before = await services.reader.require_table(ORG, SUP, T)
        acked = await rows(services)
    stored_before = {p for p in settings.storage_root.rglob("*.parquet")}

    # 150 rows: 100 updates (deleted in place from the seed file) and 50 inserts, so the
    # change publishes a file; the delete publishes none and is killed all the same.
    body = tmp_path / "change.json"
    if op == "upsert":
        body.write_text(json.dumps([{"id": i, "v": 1} for i in range(100, 250)]))
    else:
        body.write_text(json.dumps(list(range(100, 150))))
    with anyio.fail_after(120):
        doomed = await anyio.run_process(
            [sys.executable, "-c", DOOMED, op, str(body)],
            env=env_of(settings),
            cwd=ROOT,
            check=False,
        )
    assert doomed.returncode == -9, doomed.stderr.decode()
    assert doomed.stdout.decode().strip() == "published"
    published = {p for p in settings.storage_root.rglob("*.parquet")} - stored_before
    assert len(published) == (1 if op == "upsert" else 0)

    async with Services.open(settings, settings.redis_url) as services:
        after = await services.reader.require_table(ORG, SUP, T)
        assert (after.version, after.files) == (before.version, before.files)
        assert await rows(services) == acked
        # The orphan goes with gc (once older than the grace period).
        later = datetime.now(UTC) + timedelta(seconds=2 * settings.gc_grace_s)
        report = await collect_garbage(
            services.log,
            services.reader,
            services.storage,
            grace=timedelta(seconds=settings.gc_grace_s),
            dry_run=False,
            now=later,
        )
        orphans = {settings.storage_root / o.key for o in report.orphans}
        assert orphans == published
        assert await rows(services) == acked
        # And the table takes the same change now.
        if op == "upsert":
            await services.mutator.upsert(
                Target(ORG, SUP, T), open_source(body, "json", {}), ["id"]
            )
            expected = [(i, 1 if 100 <= i < 250 else 0) for i in range(300)]
        else:
            await services.mutator.delete(Target(ORG, SUP, T), keys={"id": list(range(100, 150))})
            expected = [(i, 0) for i in range(300) if not 100 <= i < 150]
        assert await rows(services) == expected
