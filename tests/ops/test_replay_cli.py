"""``ledgerlake replay [--verify]`` against a mixed workload and a corrupted snapshot."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import redis

from app.services import Services
from app.settings import Settings
from projections.catalog import TableState
from projections.store import encode_table
from tests.support.processes import Procs, cli_env
from tests.support.workload import registry_matches_log, snapshot_matches_log, write_rows


@pytest.mark.anyio
async def test_replay_verify_detects_and_repairs_a_corrupted_snapshot(
    procs: Procs, settings: Settings, services: Services, tmp_path: Path
) -> None:
    assert settings.redis_url
    env = cli_env(redis_url=settings.redis_url, redis_prefix=settings.redis_prefix)
    data = ["--data-dir", str(settings.data_dir)]

    async def w(target: str, rows: list[dict[str, object]], mode: str = "append") -> int:
        return (await write_rows(services, tmp_path, target, rows, mode=mode)).version

    # A mixed workload: appends, a schema change, an overwrite, 3 tables, 2 supers.
    await w("acme/sales/orders", [{"id": 1, "amount": 10}, {"id": 2, "amount": 20}])
    await w("acme/sales/orders", [{"id": 3, "amount": 30}])
    await w("acme/sales/customers", [{"name": "ann"}])
    evolved = await w("acme/sales/orders", [{"id": 4, "amount": 40, "note": "new column"}])
    await w("acme/ops/events", [{"kind": "a"}, {"kind": "b"}])
    await w("acme/ops/events", [{"kind": "c"}], mode="overwrite")
    await w("acme/sales/orders", [{"id": 5, "amount": 50}])
    assert evolved >= 4  # created, 2 appends, then schema evolved + append

    # Projected part-way by a worker, the rest only in the log: verify must still agree.
    burst = procs.cli("worker", "--burst", *data, env=env)
    assert burst.returncode == 0, burst.stderr
    await w("acme/sales/customers", [{"name": "bob"}])
    verify = procs.cli("replay", "--verify", *data, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verified 2 supers" in verify.stdout and "0 difference(s)" in verify.stdout
    assert "DIFF" not in verify.stderr
    burst = procs.cli("worker", "--burst", *data, env=env)
    assert burst.returncode == 0, burst.stderr
    assert await snapshot_matches_log(services, "acme", "sales") == []

    # Corrupt the stored snapshot with valid encodings of wrong states.
    r = redis.Redis.from_url(settings.redis_url)
    sales_snap = services.keys.snapshot("acme", "sales")
    ops_snap = services.keys.snapshot("acme", "ops")
    orders = msgspec.json.decode(r.hget(sales_snap, "orders"), type=TableState)
    forged = msgspec.structs.replace(orders, version=orders.version + 7, files=orders.files[:1])
    r.hset(sales_snap, "orders", encode_table(forged))
    assert r.hdel(sales_snap, "customers") == 1
    ghost = msgspec.structs.replace(orders, name="ghost")
    r.hset(ops_snap, "ghost", encode_table(ghost))

    verify = procs.cli("replay", "--verify", *data, env=env)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    diffs = [line for line in verify.stderr.splitlines() if line.startswith("DIFF ")]
    assert len(diffs) == 3, verify.stderr
    joined = "\n".join(diffs)
    assert "acme/sales/orders: differs in" in joined
    assert "version" in joined and "files" in joined
    assert "acme/sales/customers: missing from the stored snapshot" in joined
    assert "acme/ops/ghost: in the stored snapshot but not in the log" in joined
    assert "3 difference(s)" in verify.stdout

    rebuild = procs.cli("replay", *data, env=env)
    assert rebuild.returncode == 0, rebuild.stdout + rebuild.stderr
    assert "rebuilt 2 supers" in rebuild.stdout
    verify = procs.cli("replay", "--verify", *data, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "0 difference(s)" in verify.stdout
    assert r.hexists(ops_snap, "ghost") is False
    problems = await registry_matches_log(services)
    problems += await snapshot_matches_log(services, "acme", "sales")
    problems += await snapshot_matches_log(services, "acme", "ops")
    assert problems == []
    r.close()
