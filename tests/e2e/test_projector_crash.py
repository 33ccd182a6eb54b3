"""``ledgerlake worker`` survives ``kill -9`` at arbitrary points of its projection loop.

The worker runs against the suite's shared redis (``LEDGERLAKE_REDIS_URL``) under this
test's key prefix, while the test ingests in-process. A killed worker still holds its
leases until their TTL (15 s) lapses; to keep the test fast, after each ``kill -9`` the
test deletes the leases *of the dead worker only* (its pid is part of the lease value),
which is exactly the state the TTL would produce.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
import redis

from app.services import Services
from app.settings import Settings
from projections.store import CATALOG
from tests.support.processes import LEDGERLAKE, Procs, cli_env
from tests.support.workload import registry_matches_log, snapshot_matches_log, write_rows

SUPERS = (("acme", "sales"), ("acme", "ops"))


class WorkerHarness:
    def __init__(self, procs: Procs, settings: Settings, tmp: Path) -> None:
        assert settings.redis_url
        self.procs = procs
        self.tmp = tmp
        self.env = cli_env(
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
            projection_batch="1",  # commit after every event: many points to die at
        )
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.prefix = settings.redis_prefix
        self.runs = 0
        self.data_dir = ["--data-dir", str(settings.data_dir)]

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        with open(self.tmp / f"worker-{self.runs}.log", "wb") as log:
            return self.procs.spawn(
                [LEDGERLAKE, "worker", *self.data_dir], self.env, stdout=log, stderr=log
            )

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # What the lease TTL would do a few seconds later: free the dead worker's leases.
        for key in self.redis.scan_iter(match=f"{self.prefix}:*:lease:*", count=1000):
            holder = self.redis.get(key) or b""
            if f"-{proc.pid}-".encode() in holder:
                self.redis.delete(key)

    def checkpoints(self) -> tuple[bytes | None, ...]:
        keys = [f"{self.prefix}:{{registry}}:ckpt:{CATALOG}"]
        keys += [f"{self.prefix}:{{{o}/{s}}}:ckpt:{CATALOG}" for o, s in SUPERS]
        return tuple(self.redis.mget(keys))

    async def wait_for_commit(
        self, proc: subprocess.Popen[bytes], before: tuple[bytes | None, ...]
    ) -> None:
        """Bounded wait until the (freshly started) worker has committed something."""
        with anyio.fail_after(30):
            while self.checkpoints() == before:
                assert proc.poll() is None, f"worker exited with {proc.returncode}"
                await anyio.sleep(0.005)


@pytest.mark.slow
@pytest.mark.anyio
async def test_worker_survives_kill_9_at_arbitrary_points(
    procs: Procs, settings: Settings, services: Services, tmp_path: Path
) -> None:
    h = WorkerHarness(procs, settings, tmp_path)
    n = 0

    async def workload(count: int, after_each: Callable[[], Awaitable[None]] | None = None) -> None:
        nonlocal n
        for _ in range(count):
            i = n
            n += 1
            row = {"id": i, "amount": i * 3}
            if i >= 12:
                row["note"] = f"n{i}"  # from here on: a schema change (new column)
            await write_rows(services, tmp_path, "acme/sales/orders", [row, {"id": -i}])
            if i % 3 == 0:
                await write_rows(services, tmp_path, "acme/sales/customers", [{"c": i}])
            if i % 2 == 0:
                mode = "overwrite" if i % 8 == 0 else "append"
                await write_rows(services, tmp_path, "acme/ops/events", [{"e": i}], mode=mode)
            if after_each is not None:
                await after_each()

    # 1. Killed while starting up (before it holds anything).
    await workload(3)
    h.kill9(h.start())

    # 2. Killed in the middle of a backlog.
    await workload(15)
    before = h.checkpoints()
    w = h.start()
    await h.wait_for_commit(w, before)
    h.kill9(w)

    # 3. Killed right after a write, while it folds/commits the new events.
    await workload(2)
    before = h.checkpoints()
    w = h.start()
    await h.wait_for_commit(w, before)
    await workload(4)
    h.kill9(w)

    # 4. Killed in the middle of a running workload, after a write interleaved with it.
    await workload(2)
    before = h.checkpoints()
    w = h.start()
    await h.wait_for_commit(w, before)
    killed = False

    async def maybe_kill() -> None:
        nonlocal killed
        if not killed and n == 30:
            h.kill9(w)
            killed = True

    await workload(6, maybe_kill)
    assert killed

    # 5. Killed once more soon after its first commit; then a final worker, stopped
    #    gracefully (SIGTERM) while the workload runs.
    await workload(1)
    before = h.checkpoints()
    w = h.start()
    await h.wait_for_commit(w, before)
    h.kill9(w)
    await workload(1)
    before = h.checkpoints()
    w = h.start()
    await h.wait_for_commit(w, before)  # up, with its signal handlers installed
    await workload(3)
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=60) == 0, (tmp_path / f"worker-{h.runs}.log").read_text()

    burst = procs.cli("worker", "--burst", *h.data_dir, env=h.env)
    assert burst.returncode == 0, burst.stderr
    assert "projected" in burst.stderr
    verify = procs.cli("replay", "--verify", *h.data_dir, env=h.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verified 2 supers" in verify.stdout and "0 difference(s)" in verify.stdout

    problems = await registry_matches_log(services)
    for org, sup in SUPERS:
        problems += await snapshot_matches_log(services, org, sup)
        stream = services.keys.stream(org, sup)
        pending = h.redis.xpending(stream, CATALOG)
        assert pending["pending"] == 0, f"{org}/{sup}: unacknowledged entries {pending}"
    assert problems == []

    sales = await services.store.load_super("acme", "sales")
    assert sales.tables["orders"].row_count == 2 * n
    assert "note" in [c.name for c in sales.tables["orders"].columns]
    assert sales.tables["customers"].row_count == len([i for i in range(n) if i % 3 == 0])
    ops = await services.store.load_super("acme", "ops")
    last_overwrite = max(i for i in range(n) if i % 8 == 0)
    expected_events = len([i for i in range(last_overwrite, n) if i % 2 == 0])
    assert ops.tables["events"].row_count == expected_events
