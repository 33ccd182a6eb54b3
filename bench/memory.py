"""Peak memory of ``serve`` during a large ingest and a large query.

Each run starts a fresh server. Its peak resident set (VmHWM) is reset before each step
and read after it: the figures are that peak, and its growth over the resident set the
step started from (most of an idle server's RSS is its libraries). The ingest is one
Parquet body of 1M rows (10M with ``--full``) posted in one request;
the query is the group-by of the query benchmark over all of those rows. The raw
limits run in a fresh Python process each, measured the same way (growth is over the
process's RSS once its libraries are imported): pyarrow reading the
same Parquet body and writing it as Parquet with the server's options, and DuckDB
running the same query over the same file with the server's threads and memory limit.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap

from bench.core import (
    DEFAULTS,
    PARQUET,
    Measure,
    Server,
    check,
    parquet_body,
    peak_rss_mb,
    post_body,
    reset_peak_rss,
    rows_table,
    serve,
    table_files,
)

RAW_INGEST = """
import sys, pyarrow.parquet as pq
BASE = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
table = pq.read_table(sys.argv[1])
pq.write_table(table, sys.argv[2], compression="zstd", compression_level={level},
               row_group_size={rows})
"""
RAW_QUERY = """
import sys, duckdb
BASE = open('/proc/self/status').read().split('VmRSS:')[1].split()[0]
con = duckdb.connect()
con.execute("SET threads = {threads}")
con.execute("SET memory_limit = '{memory}'")
files = sys.argv[1].split(",")
con.execute(sys.argv[2].replace("FROM t", f"FROM read_parquet({{files!r}})")).fetchall()
"""
PEAK = "\nprint(BASE, open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
QUERY = "SELECT region, count(*) AS n, sum(amount) AS total, avg(qty) AS q FROM t GROUP BY region"


def _raw_peaks(script: str, *args: str) -> tuple[float, float]:
    """A fresh Python running ``script``: its RSS once the libraries were imported, and
    its peak RSS, in MiB."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + PEAK, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = out.stdout.split()[-2:]
    return int(base) / 1024, int(peak) / 1024


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    """Each run starts a fresh server (``server`` only gives its settings): a process's
    peak can be reset, but memory it freed may stay resident, so a second run in the same
    process would measure less than the first."""
    rows = 10_000_000 if full else 1_000_000
    size = f"{rows // 1_000_000}M rows"
    data = parquet_body(rows_table(rows))
    body_file = server.root / "body.parquet"
    body_file.write_bytes(data)
    label = f"ingest of {size} ({len(data) / 1e6:.0f} MB Parquet body)"
    measures = {
        (step, metric): Measure(
            "memory",
            label if step == "ingest" else f"group-by over {size}",
            metric,
            "MiB",
            "lower",
            raw_label="pyarrow read + write" if step == "ingest" else "DuckDB, same settings",
        )
        for step in ("ingest", "query")
        for metric in ("peak RSS", "peak RSS growth")
    }
    raw_ingest = RAW_INGEST.format(level=DEFAULTS.zstd_level, rows=DEFAULTS.row_group_rows)
    raw_query = RAW_QUERY.format(threads=DEFAULTS.query_threads, memory=DEFAULTS.query_memory_limit)
    idle: list[float] = []
    for _ in range(runs):
        with serve(env=server_env(server)) as fresh, fresh.client() as client:
            pid = fresh.process.pid
            before = reset_peak_rss(pid)
            idle.append(before)
            post_body(client, "/v1/bench/m/tables/t/rows", data, PARQUET)
            peak = peak_rss_mb(pid)
            base, raw_peak = _raw_peaks(raw_ingest, str(body_file), str(fresh.root / "raw.parquet"))
            measures[("ingest", "peak RSS")].add(peak, raw_peak)
            measures[("ingest", "peak RSS growth")].add(peak - before, raw_peak - base)
            files = table_files(fresh, "bench", "m", "t")
            before = reset_peak_rss(pid)
            check(client.post("/v1/bench/m/query", json={"sql": QUERY}))
            peak = peak_rss_mb(pid)
            base, raw_peak = _raw_peaks(raw_query, ",".join(files), QUERY)
            measures[("query", "peak RSS")].add(peak, raw_peak)
            measures[("query", "peak RSS growth")].add(peak - before, raw_peak - base)
    first = measures[("ingest", "peak RSS")]
    first.note = f"serve's RSS when idle: {statistics.median(idle):.0f} MiB"
    return list(measures.values())


def server_env(server: Server) -> dict[str, str]:
    return {
        k: v
        for k, v in server.env.items()
        if k.startswith("LEDGERLAKE_") and k not in ("LEDGERLAKE_REDIS_URL", "LEDGERLAKE_API_TOKEN")
    }
