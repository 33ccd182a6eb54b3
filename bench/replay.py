"""Replay speed: rebuilding the catalog from the events, against reading them raw.

The log is made of real events: a table is written through the API, and its
``RowsAppended`` event (a Parquet file with its column statistics) is then appended
again and again, with the next versions, to 100 tables of one super (100k events by
default, 1M with ``--full``); every 100 appends to a table, a ``TableCompacted`` event
merges its files, as compaction does. Replay is ``projections.replay.replay``, the code behind
``ledgerlake replay``, run in the benchmark process against the server's Redis. The raw
limit is ``XRANGE`` of the same entries in pages of the same size, without decoding.
"""

from __future__ import annotations

import asyncio
import time

from app.services import Services
from bench.core import (
    ARROW,
    Measure,
    Server,
    append_copies,
    arrow_body,
    check,
    rows_table,
    wait_for_checkpoint,
)
from events.redis_log import Keys
from projections.replay import PAGE, replay

TABLES = 100
# Every 100 appends to a table, a compaction merges its files (as background compaction
# does): without it, 1M appends would leave tables of 10,000 files each, and a catalog
# snapshot of 200 MB to rewrite on every commit (see docs/BENCHMARKS.md).
COMPACT_EVERY = 100


def _fill(server: Server, events: int) -> None:
    """Create ``TABLES`` tables through the API, then append copies of a real append
    event to them until the super's stream holds ``events`` events."""
    names = [f"t{i}" for i in range(TABLES)]
    with server.client() as client:
        for name in names:
            for _ in range(2):  # TableCreated + RowsAppended, then RowsAppended
                check(
                    client.post(
                        f"/v1/bench/r/tables/{name}/rows",
                        content=arrow_body(rows_table(1000)),
                        headers={"Content-Type": ARROW},
                    )
                )
    raw = server.raw_redis()
    try:
        have = int(raw.xlen(Keys(server.settings().redis_prefix).stream("bench", "r")))
    finally:
        raw.close()
    append_copies(server, "bench", "r", names, events - have, compact_every=COMPACT_EVERY)


def _raw_read(server: Server) -> tuple[int, float]:
    stream = Keys(server.settings().redis_prefix).stream("bench", "r")
    raw = server.raw_redis()
    try:
        started = time.perf_counter()
        count, after = 0, "-"
        while True:
            page = raw.xrange(stream, min=after, count=PAGE)
            count += len(page)
            if len(page) < PAGE:
                break
            after = "(" + page[-1][0].decode()
        return count, time.perf_counter() - started
    finally:
        raw.close()


async def _replay(server: Server) -> tuple[int, float]:
    settings = server.settings()
    async with Services.open(settings, settings.redis_url or "") as services:
        started = time.perf_counter()
        report = await replay(services.log, services.store, verify=False)
        took = time.perf_counter() - started
    if report.differences:
        raise RuntimeError(f"replay found differences: {report.differences[:3]}")
    return report.events, took


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    events = 1_000_000 if full else 100_000
    _fill(server, events)
    wait_for_checkpoint(server, "bench", "r", "catalog")
    m = Measure(
        "replay", f"{events:,} events, {TABLES} tables", "rate", "events/s", "higher",
        raw_label="XRANGE, no decoding", target="≥ 50,000 events/s",
        check=lambda m: m.median >= 50_000,
    )  # fmt: skip
    for _ in range(runs):
        count, took = asyncio.run(_replay(server))
        raw_count, raw_took = _raw_read(server)
        m.add(count / took, raw_count / raw_took)
    return [m]
