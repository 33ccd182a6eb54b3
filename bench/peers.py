"""Concurrent query throughput with ``serve --workers 2`` against one server process.

Two servers in one run, each on its own redis-server with one table (10k rows, one
file: DuckDB answers the query in well under a millisecond, so the figure is what the
service spends around it): one with ``LEDGERLAKE_SERVE_WORKERS=1``, one with ``2``.
Clients are separate processes (the benchmark's own Python must not be one more process
behind a GIL), each with one keep-alive connection, sending point lookups back to back
for a fixed time; the figure is answered queries per second. The "raw limit" column is
the one-process figure of the same run, so the ratio is the speedup (target: at least
1.6x on 2 cores).
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import random
import time
from typing import Any
from urllib.parse import urlsplit

from bench.core import ARROW, TOKEN, Measure, Server, arrow_body, check, rows_table, serve

ROWS = 10_000
CLIENTS = 8
SECONDS = 5.0
SQL = "select * from t where id = {key}"


def _client(base: str, seed: int, start: float, until: float, out: Any) -> None:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    rng = random.Random(seed)
    done = 0
    while time.time() < start:  # every client starts together
        time.sleep(0.005)
    while time.time() < until:
        body = json.dumps({"sql": SQL.format(key=rng.randrange(ROWS))})
        conn.request("POST", "/v1/bench/p/query", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        done += 1
    conn.close()
    out.put(done)


def throughput(server: Server, seed: int) -> float:
    """Queries per second of ``CLIENTS`` client processes over ``SECONDS``."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 2.0  # every client process is up before the clock starts
    until = start + SECONDS
    procs = [
        ctx.Process(target=_client, args=(server.base, seed * 100 + n, start, until, out))
        for n in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    counts: list[int] = [out.get(timeout=SECONDS + 120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sum(counts) / (until - start)


def load(server: Server) -> None:
    """One small table, one file: the query costs DuckDB little, so the figure is what
    the service spends around it (HTTP, auth, analysis, the worker hop, the audit)."""
    with server.client() as client:
        check(client.post("/v1/bench/p/tables/t/rows", content=arrow_body(rows_table(ROWS)),
                          headers={"Content-Type": ARROW}))  # fmt: skip


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    m = Measure(
        "serve --workers", f"point lookups/s, {CLIENTS} clients, 2 processes vs 1",
        "throughput", "queries/s", "higher", raw_label="1 process",
        target="≥ 1.6x one process", check=lambda m: (m.ratio or 0) >= 1.6,
    )  # fmt: skip
    load(server)
    with serve(env={"LEDGERLAKE_SERVE_WORKERS": "1"}) as single:
        load(single)
        for r in range(runs):
            two, one = throughput(server, r), throughput(single, r)
            m.add(two, one)
    return [m]


SERVER_ENV = {"LEDGERLAKE_SERVE_WORKERS": "2"}
