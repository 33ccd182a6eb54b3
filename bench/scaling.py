"""Commit latency as a table grows: 10, 1,000 and 10,000 files.

Each table is created through the API; its files are then added as copies of its real
append event, each naming a real copy of the file (so that the table is exactly what
10,000 small appends would have made, in seconds). Every write of the benchmark writes
a Parquet file (``LEDGERLAKE_INLINE_MAX_ROWS=0``) and nothing compacts, so each one
adds a file. The figure is the latency of single-row appends once the catalog has
caught up; the raw limit is an ``XADD`` to the same Redis. Query planning against the
number of tables in a super is in the query benchmark.
"""

from __future__ import annotations

import asyncio

from bench.core import Measure, Server, append_copies, percentile, wait_for_checkpoint
from bench.writes import raw_xadds, timed_writes

SERVER_ENV = {"LEDGERLAKE_INLINE_MAX_ROWS": "0", "LEDGERLAKE_COMPACT_INTERVAL_S": "0"}
SIZES = (10, 1_000, 10_000)


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    writes = 100
    measures: dict[int, Measure] = {}
    for size in SIZES:
        m = Measure(
            "commit latency", f"single-row append, table of {size:,} files", "p50", "ms",
            "lower", raw_label="XADD",
        )  # fmt: skip
        p99 = Measure(
            "commit latency", f"single-row append, table of {size:,} files", "p99", "ms",
            "lower", raw_label="XADD",
        )  # fmt: skip
        for run in range(runs):
            table = f"f{size}_{run}"
            path = f"/v1/bench/s/tables/{table}/rows"
            asyncio.run(timed_writes(server, [path], 1))  # creates it, with one file
            append_copies(server, "bench", "s", [table], size - 1, copy_files=True)
            wait_for_checkpoint(server, "bench", "s", "catalog")
            ours = asyncio.run(timed_writes(server, [path] * writes, 1))
            raw = asyncio.run(raw_xadds(server, writes, 1, 1))
            m.add(percentile(ours, 50), percentile(raw, 50))
            p99.add(percentile(ours, 99), percentile(raw, 99))
        measures[size] = m
        measures[-size] = p99
    small, large = measures[SIZES[0]], measures[SIZES[-1]]
    large.target = "flat (≤ 1.5x of 10 files)"
    large.check = lambda m: m.median <= 1.5 * small.median
    large.note = f"{large.median / small.median:.2f}x the 10-file figure"
    return [measures[s] for s in SIZES] + [measures[-s] for s in SIZES]
