"""Peak memory of ``serve`` during a large ingest and a large query.

The server's peak resident set (VmHWM) is reset before each step and read after it;
the figure is the growth of the peak over the resident set the step started from.
The ingest is one Parquet body of 1M rows (10M with ``--full``) posted in one request;
the query is the group-by of the query benchmark over all of those rows. The raw
limits run in a fresh Python process each, measured the same way: pyarrow reading the
same Parquet body and writing it as Parquet with the server's options, and DuckDB
running the same query over the same file with the server's threads and memory limit.
"""

from __future__ import annotations

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
    rss_mb,
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


def _raw_growth_mb(script: str, *args: str) -> float:
    """Peak RSS of a fresh Python running ``script``, over its RSS once the libraries
    were imported, in MiB."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + PEAK, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak = out.stdout.split()[-2:]
    return (int(peak) - int(base)) / 1024


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    rows = 10_000_000 if full else 1_000_000
    size = f"{rows // 1_000_000}M rows"
    data = parquet_body(rows_table(rows))
    body_file = server.root / "body.parquet"
    body_file.write_bytes(data)
    pid = server.process.pid
    idle = rss_mb(pid)
    ingest = Measure(
        "memory", f"ingest of {size} ({len(data) / 1e6:.0f} MB Parquet body)", "peak RSS growth",
        "MiB", "lower", raw_label="pyarrow read + write",
        note=f"serve's RSS when idle: {idle:.0f} MiB",
    )  # fmt: skip
    query = Measure(
        "memory", f"group-by over {size}", "peak RSS growth", "MiB", "lower",
        raw_label="DuckDB, same settings",
    )  # fmt: skip
    raw_ingest = RAW_INGEST.format(level=DEFAULTS.zstd_level, rows=DEFAULTS.row_group_rows)
    raw_query = RAW_QUERY.format(threads=DEFAULTS.query_threads, memory=DEFAULTS.query_memory_limit)
    with server.client() as client:
        for run in range(runs):
            before = reset_peak_rss(pid)
            post_body(client, f"/v1/bench/m/tables/t{run}/rows", data, PARQUET)
            ours = peak_rss_mb(pid) - before
            raw = _raw_growth_mb(raw_ingest, str(body_file), str(server.root / "raw.parquet"))
            ingest.add(ours, raw)
            files = table_files(server, "bench", "m", f"t{run}")
            before = reset_peak_rss(pid)
            sql = QUERY.replace("FROM t", f"FROM t{run}")
            check(client.post("/v1/bench/m/query", json={"sql": sql}))
            ours = peak_rss_mb(pid) - before
            raw = _raw_growth_mb(raw_query, ",".join(files), QUERY)
            query.add(ours, raw)
    return [ingest, query]
