"""What running queries in worker processes costs (issue 18): the same queries over the
same 100 files through the query engine (analysis, a worker process, Arrow frames back)
against the in-process path it replaced (analysis, then the query on a kept sandboxed
connection in a thread of the service, with its timer), both in this process and warm.

The files are the query benchmark's table (1M rows in 100 files, loaded through the
API); the engine gets the table version directly, so HTTP, auth and the catalog read are
out of both figures. A third case runs ``SELECT 1``: the hop itself.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio
import pyarrow.parquet as pq

from bench.core import DEFAULTS, Measure, Server, percentile
from bench.query import FILES, QUERIES, load
from events.model import ColumnStats, DataFile, Field
from projections.arrow import from_arrow
from projections.catalog import TableState
from projections.query.analysis import analyze_sql
from projections.query.engine import QueryEngine
from projections.query.sandbox import sandboxed_connection
from projections.query.types import Analysis, QueryLimits, ViewSource
from projections.query.wire import View

CASES = {"SELECT 1": "SELECT 1", **{k: QUERIES[k] for k in ("point lookup", "count(*)")}}
REPS = 40


def table_of(files: list[str]) -> TableState:
    schema = pq.read_schema(files[0])
    columns = tuple(Field(f.name, from_arrow(f.type)) for f in schema)
    stats = {f.name: ColumnStats(null_count=0) for f in schema}
    data = tuple(
        DataFile(path=p, rows=pq.read_metadata(p).num_rows, size_bytes=Path(p).stat().st_size,
                 columns=stats)
        for p in files
    )  # fmt: skip
    now = datetime.now(UTC)
    return TableState(name="t", columns=columns, version=1, files=data, created_at=now,
                      updated_at=now, created_by="bench", updated_by="bench",
                      last_event_id="1-0", incarnation="1-0")  # fmt: skip


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    rows = 10_000_000 if full else 1_000_000
    files = load(server, rows, sup="iso")
    assert len(files) == FILES
    table = table_of(files)
    limits = QueryLimits(threads=DEFAULTS.query_threads, memory_limit=DEFAULTS.query_memory_limit)
    measures = []
    with TemporaryDirectory() as tmp:
        engine = QueryEngine(lambda p: p, limits, Path(tmp) / "q")
        view = View(table.columns, table.files)
        con = sandboxed_connection(engine.config, {"t": view}, lambda p: p, Path(tmp) / "in", None)

        async def resolve(analysis: Analysis) -> dict[str, ViewSource]:
            return {"t": table}

        async def in_process(sql: str) -> object:
            analysis = await anyio.to_thread.run_sync(lambda: analyze_sql(sql, max_chars=100_000))

            def execute() -> object:
                timer = threading.Timer(30, con.interrupt)
                timer.start()
                try:
                    return con.execute(analysis.sql).to_arrow_table()
                finally:
                    timer.cancel()

            return await anyio.to_thread.run_sync(execute)

        async def in_worker(sql: str) -> object:
            return await engine.run(resolve, sql, scope="bench/iso")

        async def timed(fn: object, sql: str, keys: list[int]) -> list[float]:
            out = []
            for i, key in enumerate(keys):
                started = time.perf_counter()
                await fn(sql.format(key=key))  # type: ignore[operator]
                if i >= 3:  # warm-up
                    out.append((time.perf_counter() - started) * 1000)
            return out

        async def main() -> None:
            for name, sql in CASES.items():
                m = Measure(
                    "query isolation", f"{name}, {rows // 1_000_000}M rows, {FILES} files",
                    "p50", "ms", "lower", raw_label="in process (the old path)",
                    target="≤ +1 ms", check=lambda m: (m.overhead or 0) <= 1.0,
                )  # fmt: skip
                for r in range(runs):
                    keys = [random.Random(r * 1000 + i).randrange(rows) for i in range(REPS + 3)]
                    ours = await timed(in_worker, sql, keys)
                    raw = await timed(in_process, sql, keys)
                    m.add(percentile(ours, 50), percentile(raw, 50))
                measures.append(m)

        anyio.run(main)
        con.close()
        engine.close()
    return measures
