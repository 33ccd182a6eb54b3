"""Chaos: concurrent appenders, key writers (upserts, deletes) and a reader against a real
``serve`` on a durable Redis and an S3 server, while at seeded random points ``serve``
and Redis are killed with SIGKILL and S3 is stopped (alone, and ``serve`` killed in the
middle of an outage). Writes are retried with their Idempotency-Key until acknowledged.
Afterwards no acknowledged write may be missing or wrong, no row duplicated, the
projections must equal a replay of the log, gc must account for every stored object,
and both mirrors must read back what a query returns.

``CHAOS_SEED=<n>`` repeats a run (the seed is printed, and in every failure message);
the interleaving of the threads is not part of the seed, the plan and payloads are.
``CHAOS_SCALE=<k>`` multiplies the writes and faults (a longer soak; default 1), and
``CHAOS_SETTINGS="deletion_vectors=false inline_max_rows=0"`` adds settings of serve
(not background compaction: its files in flight would race the census's gc). The first
pod runs two server processes (``serve --workers 2``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.clients import Appender, KeyWriter, Reader, Session
from tests.chaos.faults import KINDS, Injector, fault_plan
from tests.chaos.ledger import Ledger
from tests.chaos.verify import Census, census, check_mirrors, check_rows, replay_verify, settle
from tests.support.chaos import ChaosCluster
from tests.support.processes import Procs

SERVERS = int(os.environ.get("CHAOS_SERVERS", "2"))  # API pods on one Redis and bucket
APPENDERS, APPEND_OPS = 2, 90
KEY_WRITERS, KEY_OPS = 2, 60
FAULTS_PER_KIND = {
    "serve_sigkill": 2,
    "redis_sigkill": 2,
    "s3_stop": 2,
    "serve_sigkill_in_redis_outage": 1,
    "serve_sigkill_in_s3_outage": 1,
}
JOIN_TIMEOUT_S = 600.0


def chaos_seed() -> int:
    raw = os.environ.get("CHAOS_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


def serve_settings() -> dict[str, str]:
    """More settings of serve, from ``CHAOS_SETTINGS="compact_interval_s=1 ..."``."""
    pairs = (item.split("=", 1) for item in os.environ.get("CHAOS_SETTINGS", "").split())
    settings = {name.lower(): value for name, value in pairs}
    if float(settings.get("compact_interval_s", 0)):
        raise pytest.UsageError("CHAOS_SETTINGS: background compaction races the census's gc")
    return settings


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)  # fmt: skip
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


@pytest.mark.slow
def test_acknowledged_writes_survive_chaos(
    procs: Procs, tmp_path: Path, record_property: Any
) -> None:
    seed = chaos_seed()
    scale = int(os.environ.get("CHAOS_SCALE", "1"))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats this run), scale {scale}")
    record_property("chaos_seed", seed)
    rng = random.Random(seed)
    started = time.monotonic()
    ledger = Ledger()
    before = Census()
    injector: Injector | None = None
    reader: Reader | None = None
    done, stop = threading.Event(), threading.Event()
    cluster = ChaosCluster(procs, tmp_path / "chaos", SERVERS, **serve_settings())
    try:
        cluster.start()
        writers = [
            *(Appender(f"appender{n}", n, APPEND_OPS * scale, cluster, ledger, seed)
              for n in range(APPENDERS)),
            *(KeyWriter(f"keywriter{n}", n, KEY_OPS * scale, cluster, ledger, seed)
              for n in range(KEY_WRITERS)),
        ]  # fmt: skip
        total = APPENDERS * APPEND_OPS * scale + KEY_WRITERS * KEY_OPS * scale
        per_kind = {k: n * scale for k, n in FAULTS_PER_KIND.items()}
        plan = fault_plan(rng, total, per_kind, SERVERS)
        print("fault plan:", ", ".join(map(str, plan)))
        reader = Reader("reader", 0, 100_000, cluster, ledger, seed, stop=stop)
        injector = Injector(cluster, ledger, plan, done)
        for thread in (*writers, reader, injector):
            thread.start()
        for thread in writers:
            thread.join(JOIN_TIMEOUT_S)
            assert not thread.is_alive(), f"{thread.name} is stuck (seed {seed})"
        done.set()
        ledger.notify()
        injector.join(JOIN_TIMEOUT_S)
        stop.set()
        reader.join(JOIN_TIMEOUT_S)
        assert not injector.is_alive() and not reader.is_alive(), f"stuck (seed {seed})"
        loaded = time.monotonic() - started

        findings: dict[str, str] = {}
        if (problem := settle(cluster)) is not None:
            findings["settle"] = problem
        session = Session(cluster, ledger, random.Random(seed))
        try:
            findings.update(check_rows(session, ledger))
            if (problem := replay_verify(procs, cluster)) is not None:
                findings["replay --verify"] = problem
            before, after = census(cluster)
            if after.orphans or after.unowned or before.unowned:
                findings["storage"] = (
                    f"after gc: orphans {after.orphans[:5]}, never collected "
                    f"{(before.unowned + after.unowned)[:5]}"
                )
            # An orphan is the file of a write whose attempt failed, or that a kill -9
            # interrupted (a write, an inline flush): more would be a leak.
            kills = sum(n for kind, n in ledger.faults.items() if kind.startswith("serve"))
            bound = ledger.failed_attempts() + kills
            if len(before.orphans) > bound:
                findings["orphans"] = f"{len(before.orphans)} orphans, at most {bound} explained"
            findings.update(check_rows(session, ledger))  # gc deleted nothing it needed
            findings.update(check_mirrors(cluster, session))
            if crashed := cluster.crashed():
                findings["serve exited by itself"] = "; ".join(crashed)
        finally:
            session.close()
    finally:
        # On a failure above the threads may still run: stop them before the cluster,
        # so that no fault step starts Redis or S3 again after it closed.
        done.set()
        stop.set()
        ledger.set_gate(float("inf"))
        cluster.closed = True
        for left in (injector, reader):
            if left is not None:
                left.join(JOIN_TIMEOUT_S)
        cluster.close()
    figures = {
        "seed": seed,
        "commit": commit(),
        **ledger.figures(),
        "faults_after_the_writes": injector.idle if injector else None,
        "orphans_collected": len(before.orphans),
        "storage": dict(sorted(before.kinds.items())),
        "seconds": {"load": round(loaded, 1), "total": round(time.monotonic() - started, 1)},
    }
    print("chaos figures:", json.dumps(figures))
    record_property("chaos_figures", json.dumps(figures))
    problems = [*ledger.anomalies, *(f"{k}: {v}" for k, v in findings.items())]
    assert not problems, f"seed {seed}: " + "\n".join(problems)
    assert set(ledger.faults) == set(KINDS) and ledger.lost == 0 and ledger.duplicates == 0
    assert injector is not None and injector.idle == 0, "a fault struck after the writes"
