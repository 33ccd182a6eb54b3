"""SuperTable's side of the side-by-side workload of issue 19 (bench/versus.py).

What it measures
    SuperTable (https://github.com/kladnasoft/supertable) doing the workload that
    Ledgerlake's ``bench/versus.py`` does over HTTP, through SuperTable's Python SDK, in
    this one process, on the schema of ``bench/supertable_side.py`` (``id int64``
    unique, ``name string``, ``amount float64``, ``region string``, five regions; the
    rows are that file's ``base_rows``, so both systems get the same values):

    0. untimed: one write of one row to a table ``warmup`` and one query of it, so that
       no timed call pays for SuperTable's lazy imports and first-use setup;
    1. **bulk append**: ``--batches`` (default 10) batches of ``--batch-rows`` (default
       10,000) rows into a new table ``orders``, each one
       ``DataWriter.write(..., overwrite_columns=[])`` (a plain append; the first one
       also creates the table). The figure is rows/s over the sum of the ``write()``
       calls (building the Arrow batches is not timed);
    2. **warm count(*)**: ``SELECT count(*) AS n FROM orders`` over the resulting
       100k-row table through ``DataReader.execute`` (DuckDB engine), ``--warmup``
       (default 3) untimed runs, then ``--queries`` (default 30) timed: p50 and p99;
    3. **group-by**: ``SELECT region, count(*) AS n, sum(amount) AS total FROM orders
       GROUP BY region``, the same way; its result is printed too, so that the caller
       can check both systems computed the same thing;
    4. **single-row write**: into a second table ``singles`` (so that ``orders`` stays
       at exactly 100k rows), one untimed write that creates it, then ``--singles``
       (default 200) timed ``write()`` calls of one row each (a plain append): p50 and
       p99.

    Each timing is the SDK call alone (``time.perf_counter`` around ``write()`` or
    ``execute()``, which includes turning the result into SuperTable's data frame).
    Row counts are checked through the query API at the end (``orders`` holds
    batches x batch-rows rows, ``singles`` singles + 1). The file layout of ``orders``
    after the load is reported, as are the fsyncs SuperTable itself makes during each
    step (counted, never added or removed).

How it is run
    With SuperTable's own virtual environment, never Ledgerlake's::

        /work/supertable-venv/bin/python bench/supertable_workload.py [--singles N]

    (also ``--batches``, ``--batch-rows``, ``--queries``, ``--warmup``, ``--keep``). It
    imports nothing from the Ledgerlake repository except its sibling file
    ``bench/supertable_side.py`` (itself SuperTable-only: the redis-server helper, the
    environment, the rows, the fsync counter and the SDK wrapper are shared with the
    upsert comparison rather than copied). It prints one JSON object on one line to
    stdout, the last line; SuperTable's own logging goes to stderr.

How SuperTable is installed
    ``python3 -m venv /work/supertable-venv && /work/supertable-venv/bin/pip install
    supertable==3.4.3`` (from PyPI; this script reports the version it imported).

What the comparison is, and is not
    It is SuperTable's best case against Ledgerlake's ordinary one. SuperTable runs in
    process: no HTTP, no server, no serialization of the result to a client, no
    authentication (role ``superadmin``). Its storage is the LOCAL backend in a fresh
    temporary directory; its catalog, locks and counters are in a private redis-server
    on 127.0.0.1 (a free port, ``--save '' --appendonly no``: Redis never touches the
    disk), started by ``supertable_side.redis_server`` and stopped by its pid. Its
    Parquet data files are written without fsync; its LocalStorage fsyncs the snapshot
    JSON once per commit as shipped, which is left in place and counted (``fsync`` in
    the output), so "no fsync" holds for the data, not for that small metadata file.
    Every other SuperTable setting is its default (monitoring enqueue to Redis on, its
    automatic small-file compaction on, DuckDB engine). Ledgerlake's side, by contrast,
    goes through its HTTP API with every default setting (Delta and Iceberg mirrors and
    the archive on) and acknowledges a write only once its event is fsync'd by Redis
    (``appendfsync always``) and its Parquet file is fsync'd.

    It is not a concurrency test (one client, one call at a time), not a large-data
    test (100k rows) and not a test of SuperTable's server or REST API, which this
    script does not start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from bench import supertable_side as side
else:  # run as a script from bench/, in SuperTable's environment: its sibling module
    import supertable_side as side

ORDERS = side.TABLE
SINGLES = "singles"
WARMUP_TABLE = "warmup"
COUNT_SQL = f"SELECT count(*) AS n FROM {ORDERS}"
GROUP_SQL = f"SELECT region, count(*) AS n, sum(amount) AS total FROM {ORDERS} GROUP BY region"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as bench/core.py computes it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def one_row(row_id: int) -> pa.Table:
    return side.base_rows(row_id, 1)


class Workload:
    """The timed SDK calls, with SuperTable's own fsyncs counted around each step."""

    def __init__(self, fsync: side.FsyncCounter) -> None:
        self.sdk = side.SuperTableBench(fsync)
        self.fsync = fsync

    def append(self, table: str, data: pa.Table) -> float:
        """One ``DataWriter.write`` appending ``data`` to ``table``: its ms."""
        started = time.perf_counter()
        self.sdk.writer.write(
            role_name=side.ROLE, simple_name=table, data=data, overwrite_columns=[]
        )
        return (time.perf_counter() - started) * 1000

    def query(self, sql: str) -> tuple[float, list[dict[str, Any]]]:
        started = time.perf_counter()
        rows = self.sdk.query(sql)
        return (time.perf_counter() - started) * 1000, rows

    def counted(self, step: Callable[[], list[float]]) -> tuple[list[float], dict[str, float]]:
        """Run ``step`` (which returns its timings); its timings and SuperTable's fsyncs
        during it."""
        calls0, secs0 = self.fsync.snapshot()
        timings = step()
        calls1, secs1 = self.fsync.snapshot()
        return timings, {"calls": calls1 - calls0, "ms": round((secs1 - secs0) * 1000, 3)}


def timed_queries(work: Workload, sql: str, warmup: int, count: int) -> list[float]:
    for _ in range(warmup):
        work.query(sql)
    return [work.query(sql)[0] for _ in range(count)]


def summary(ms: list[float]) -> dict[str, Any]:
    return {
        "ms": [round(t, 3) for t in ms],
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
    }


def run_workload(args: argparse.Namespace, fsync: side.FsyncCounter) -> dict[str, Any]:
    work = Workload(fsync)
    n = args.batch_rows
    batches = [side.base_rows(i * n, n) for i in range(args.batches)]
    # Untimed: a first write and query, so that no timed call pays for lazy imports and
    # first-use setup (Ledgerlake's side does the same to a server that already runs).
    work.append(WARMUP_TABLE, one_row(-1))
    work.query(f"SELECT count(*) AS n FROM {WARMUP_TABLE}")
    bulk_ms, bulk_fsync = work.counted(lambda: [work.append(ORDERS, b) for b in batches])
    rows = args.batches * n
    layout = work.sdk.layout()

    count_ms, count_fsync = work.counted(
        lambda: timed_queries(work, COUNT_SQL, args.warmup, args.queries)
    )
    group_ms, _ = work.counted(lambda: timed_queries(work, GROUP_SQL, args.warmup, args.queries))
    counted = int(work.query(COUNT_SQL)[1][0]["n"])
    groups = sorted(
        (str(r["region"]), int(r["n"]), float(r["total"])) for r in work.query(GROUP_SQL)[1]
    )

    work.append(SINGLES, one_row(rows))  # creates the table: not a single-row append
    single_ms, single_fsync = work.counted(
        lambda: [work.append(SINGLES, one_row(rows + 1 + i)) for i in range(args.singles)]
    )
    singles_counted = int(work.query(f"SELECT count(*) AS n FROM {SINGLES}")[1][0]["n"])

    checks = {
        "orders_row_count": counted == rows,
        "group_by_row_count": sum(g[1] for g in groups) == rows,
        "singles_row_count": singles_counted == args.singles + 1,
    }
    return {
        "supertable_version": work.sdk.version,
        "bulk": {
            "batches": args.batches,
            "batch_rows": n,
            "ms": [round(t, 3) for t in bulk_ms],
            "rows_per_s": round(rows / (sum(bulk_ms) / 1000), 1),
            "files_after_load": len(layout.files),
            "rows_per_file": layout.rows_per_file,
            "fsync": bulk_fsync,
        },
        "single": {**summary(single_ms), "writes": args.singles, "fsync": single_fsync},
        "count": {**summary(count_ms), "sql": COUNT_SQL, "fsync": count_fsync},
        "group_by": {**summary(group_ms), "sql": GROUP_SQL, "result": groups},
        "verified": all(checks.values()),
        "checks": checks,
        "note": (
            "SuperTable SDK in process (no HTTP), LOCAL storage in a temp dir, catalog in "
            "a private redis-server (no persistence); writes are DataWriter.write(overwrite_"
            "columns=[]) appends, queries DataReader.execute (DuckDB); data files not "
            "fsynced, the snapshot JSON fsynced per commit as shipped (see each 'fsync')."
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="bulk-append batches")
    parser.add_argument("--batch-rows", type=int, default=10_000, help="rows per batch")
    parser.add_argument("--singles", type=int, default=200, help="timed single-row writes")
    parser.add_argument("--queries", type=int, default=30, help="timed runs of each query")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each query")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if min(args.batches, args.batch_rows, args.singles, args.queries) < 1 or args.warmup < 0:
        parser.error("need positive --batches, --batch-rows, --singles, --queries")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="supertable-workload-"))
    fsync = side.FsyncCounter()
    try:
        with side.stdout_to_stderr() as real_stdout, side.redis_server(workdir) as port:
            home = workdir / "home"
            home.mkdir()
            side.configure_supertable_env(home, port)
            os.chdir(home)  # SuperTable resolves LOCAL paths relative to its home
            fsync.install()
            output = run_workload(args, fsync)
            os.write(real_stdout, (json.dumps(output) + "\n").encode())
    finally:
        os.chdir(tempfile.gettempdir())
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
