"""Ledgerlake against SuperTable 3.4.3, the same workload side by side in one run
(issue 19).

The workload, on both sides, on the schema and rows of ``bench/supertable_side.py``
(``id int64`` unique, ``name string``, ``amount float64``, ``region string``; the same
values on both sides, built by that file's ``base_rows``):

- **bulk append**: 10 batches of 10,000 rows (``--full`` does not change the sizes)
  into a new table, one request (one SDK call) per batch, the first of which creates
  the table: rows/s over the sum of the 10 calls.
  Ledgerlake's bodies are Arrow IPC streams (``application/vnd.apache.arrow.stream``),
  built before the clock starts.
- **single-row write**: 200 appends of one row (1,000 with ``--full``), one at a time,
  to a second table (created by one untimed write first, so that the 100k-row table
  stays at 100k rows): p50 and p99. Ledgerlake's bodies are JSON arrays of one object.
- **warm count(*)**: ``SELECT count(*) AS n FROM orders`` over the 100k-row table, 3
  untimed runs, then 30 timed: p50.
- **group-by**: ``SELECT region, count(*) AS n, sum(amount) AS total FROM orders GROUP BY
  region``, the same way: p50. Both systems' results are compared (same groups, counts,
  and sums to 1e-9), as is the count.

Each side first makes one untimed one-row write to a table ``warmup`` and one query of
it, in each run, so that no timed call pays for first-use setup (lazy imports on
SuperTable's side, a super's first write and first query on Ledgerlake's).

Ledgerlake's side goes through the HTTP API of the ``serve`` that ``bench/__main__.py``
starts, with one keep-alive ``httpx`` client, and that server runs with every default
setting (``SERVER_ENV``, as ``writes.DEFAULT_ENV``: Delta and Iceberg mirrors and the
archive on, so every write is also published and archived by the same process). A write
is acknowledged once its Parquet file is fsync'd and its event is fsync'd by Redis
(``appendfsync always``). Before the queries, and before SuperTable's turn, the
benchmark waits until the catalog and both mirrors have applied every event, so that
publishing one step's writes does not run during the next step's clock (the archive,
which waits up to 5 s by design, is not waited for).

SuperTable's side (``bench/supertable_workload.py``, whose docstring says exactly what it
does) runs in each run, after Ledgerlake's, as a subprocess in SuperTable's own virtual
environment (``BENCH_SUPERTABLE_PYTHON``, default ``/work/supertable-venv/bin/python``;
``pip install supertable==3.4.3`` there, never in Ledgerlake's): its Python SDK in
process, no HTTP, LOCAL storage in a temporary directory, its catalog in a private
redis-server without persistence, data files not fsync'd (its snapshot JSON is, once per
commit, as shipped). Each figure's "raw" is SuperTable's figure in the same run, so the
ratio is Ledgerlake's over SuperTable's: for rows/s a share (150% = 1.5x the rows/s), for
latency a multiple (0.33x = 3x faster). The targets are the issue's: bulk append at
least 1.5x, single-row write at least 3x, count(*) and group-by at least 2x faster.

What the comparison is not: the same work under the same guarantees. SuperTable skips
the network, the HTTP stack, authentication, JSON encoding of results and the fsync of
its data; Ledgerlake does all of them and publishes two mirrors. That is the comparison
the issue asks for; a loss here may be the price of those guarantees, and a win is
one despite them. It is also one client at a time, on 100k rows, with both systems and
the client on the same 2 cores. If SuperTable's Python is missing, Ledgerlake's figures
are recorded without the comparison (no ratio, no target verdict).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.core import ARROW, JSON, Measure, Server, arrow_body, check, percentile
from bench.core import wait_for_checkpoint as _wait_for
from bench.supertable_side import base_rows
from bench.writes import DEFAULT_ENV

ORG = "bench"
BATCHES, BATCH_ROWS = 10, 10_000
WARMUP, QUERIES = 3, 30
COUNT_SQL = "SELECT count(*) AS n FROM orders"
GROUP_SQL = "SELECT region, count(*) AS n, sum(amount) AS total FROM orders GROUP BY region"
SUPERTABLE_PYTHON = os.environ.get("BENCH_SUPERTABLE_PYTHON", "/work/supertable-venv/bin/python")
SUPERTABLE_RAW = "SuperTable 3.4.3: SDK, no HTTP, data not fsynced"
# Every default: each write is also published to Delta and Iceberg, and archived.
SERVER_ENV = dict(DEFAULT_ENV)


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    singles = 1000 if full else 200
    bulk = _measure(
        "bulk append", f"{BATCHES} x {BATCH_ROWS:,} rows, Arrow body", "throughput", "rows/s",
        "higher", "≥ 150% of SuperTable (1.5x)", lambda m: (m.ratio or 0) >= 1.5,
    )  # fmt: skip
    case = f"1 row, JSON, {singles} in sequence"
    single = _measure(
        "single-row write", case, "p50", "ms", "lower", "≤ 0.33x SuperTable (3x faster)",
        lambda m: (m.ratio or 9) <= 1 / 3,
    )  # fmt: skip
    single99 = _measure("single-row write", case, "p99", "ms", "lower", "", None)
    count = _measure(
        "count(*)", "warm, 100k rows / 10 files", "p50", "ms", "lower",
        "≤ 0.5x SuperTable (2x faster)", lambda m: (m.ratio or 9) <= 0.5,
    )  # fmt: skip
    group = _measure(
        "group-by", "region: count, sum; 100k rows", "p50", "ms", "lower",
        "≤ 0.5x SuperTable (2x faster)", lambda m: (m.ratio or 9) <= 0.5,
    )  # fmt: skip
    measures = [bulk, single, single99, count, group]
    notes: dict[str, None] = {}  # distinct, in order
    for r in range(runs):
        ours = _ledgerlake(server, f"v{r}", singles)
        if ours["files"] != BATCHES:
            notes[f"Ledgerlake's table had {ours['files']} files after the batches"] = None
        theirs = _supertable(singles)
        if theirs is None:
            for m, value in zip(measures, ours["figures"], strict=True):
                m.add(value)
            continue
        _same_answers(ours, theirs)
        figures = (
            theirs["bulk"]["rows_per_s"], theirs["single"]["p50_ms"],
            theirs["single"]["p99_ms"], theirs["count"]["p50_ms"],
            theirs["group_by"]["p50_ms"],
        )  # fmt: skip
        for m, value, raw in zip(measures, ours["figures"], figures, strict=True):
            m.add(value, raw)
        files = theirs["bulk"]["files_after_load"]
        if files != BATCHES:
            notes[f"SuperTable's table had {files} files after the batches"] = None
        per_single = theirs["single"]["fsync"]["calls"] / singles
        notes[f"SuperTable fsyncs its snapshot JSON {per_single:g}x per single-row write"] = None
    if not any(m.raw for m in measures):
        for m in measures:
            m.check = None
        bulk.note = f"SuperTable not compared: no {SUPERTABLE_PYTHON}; " + "; ".join(notes)
    else:
        bulk.note = (
            "raw = SuperTable's figure in the same run (bench/supertable_workload.py); "
            + "; ".join(notes)
        )
    return measures


def _measure(
    scenario: str, case: str, metric: str, unit: str, better: str, target: str, ok: Any
) -> Measure:
    return Measure(
        f"vs SuperTable: {scenario}", case, metric, unit, better, raw_label=SUPERTABLE_RAW,
        target=target, check=ok,
    )  # fmt: skip


def _caught_up(server: Server, sup: str) -> None:
    """Wait until the catalog and each mirror the server publishes have applied every
    event of ``sup``."""
    mirrors = server.env.get("LEDGERLAKE_MIRRORS", "delta,iceberg")
    names = [m.strip() for m in mirrors.split(",") if m.strip() and m.strip() != "none"]
    for projection in ["catalog", *(f"mirror-{m}" for m in names)]:
        _wait_for(server, ORG, sup, projection)


def _timed_post(client: Any, path: str, data: bytes, content_type: str) -> tuple[float, Any]:
    started = time.perf_counter()
    response = client.post(path, content=data, headers={"Content-Type": content_type})
    took = (time.perf_counter() - started) * 1000
    return took, check(response)


def _ledgerlake(server: Server, sup: str, singles: int) -> dict[str, Any]:
    """Ledgerlake's side of one run, in the super ``sup``: its five figures (bulk rows/s,
    single p50, single p99, count p50, group-by p50), and its query answers."""
    url = f"/v1/{ORG}/{sup}"
    rows = BATCHES * BATCH_ROWS
    bodies = [arrow_body(base_rows(i * BATCH_ROWS, BATCH_ROWS)) for i in range(BATCHES)]
    with server.client() as client:
        # Untimed, as on SuperTable's side: a first write and query in this super.
        warm = json.dumps(base_rows(-1, 1).to_pylist()).encode()
        _timed_post(client, f"{url}/tables/warmup/rows", warm, JSON)
        check(client.post(f"{url}/query", json={"sql": "SELECT count(*) FROM warmup"}))
        _caught_up(server, sup)
        bulk_ms = [_timed_post(client, f"{url}/tables/orders/rows", b, ARROW)[0] for b in bodies]
        _caught_up(server, sup)
        version = check(client.get(f"{url}/tables/orders"))["version"]
        files = len(check(client.get(f"{url}/tables/orders/versions/{version}"))["files"])

        def query(sql: str) -> tuple[float, Any]:
            data = json.dumps({"sql": sql}).encode()
            return _timed_post(client, f"{url}/query", data, JSON)

        timings = {}
        for sql in (COUNT_SQL, GROUP_SQL):
            for _ in range(WARMUP):
                query(sql)
            timings[sql] = [query(sql)[0] for _ in range(QUERIES)]
        counted = query(COUNT_SQL)[1]["rows"][0][0]
        groups = query(GROUP_SQL)[1]["rows"]

        def one_row(i: int) -> bytes:
            return json.dumps(base_rows(rows + i, 1).to_pylist()).encode()

        path = f"{url}/tables/singles/rows"
        _timed_post(client, path, one_row(0), JSON)  # creates the table: not timed
        single_ms = [_timed_post(client, path, one_row(1 + i), JSON)[0] for i in range(singles)]
        detail = check(client.get(f"{url}/tables/singles"))
        assert detail["row_count"] == singles + 1, detail
        _caught_up(server, sup)  # SuperTable's turn does not share the cores with mirrors
    assert counted == rows, counted
    return {
        "figures": [
            rows / (sum(bulk_ms) / 1000), percentile(single_ms, 50), percentile(single_ms, 99),
            percentile(timings[COUNT_SQL], 50), percentile(timings[GROUP_SQL], 50),
        ],
        "files": files,
        "groups": sorted([str(g), int(n), float(t)] for g, n, t in groups),
    }  # fmt: skip


def _same_answers(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Both systems computed the same group-by (and so the same count)."""
    assert theirs["verified"], theirs["checks"]
    mine, other = ours["groups"], theirs["group_by"]["result"]
    assert [g[:2] for g in mine] == [g[:2] for g in other], (mine, other)
    assert all(math.isclose(a[2], b[2], rel_tol=1e-9) for a, b in zip(mine, other, strict=True))


def _supertable(singles: int) -> dict[str, Any] | None:
    """SuperTable's figures for the same workload, in its own environment (or None)."""
    script = Path(__file__).with_name("supertable_workload.py")
    if not (Path(SUPERTABLE_PYTHON).exists() and script.exists()):
        return None
    args = ["--batches", str(BATCHES), "--batch-rows", str(BATCH_ROWS), "--singles",
            str(singles), "--queries", str(QUERIES), "--warmup", str(WARMUP)]  # fmt: skip
    done = subprocess.run(
        [SUPERTABLE_PYTHON, str(script), *args],
        capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
