"""Changes by key (issue 17): upsert and delete latency, concurrent changes of one
table, and queries over a table with deletion vectors.

- **Upsert / delete by key**: 1,000 random existing keys into a table of 100k rows in
  10 files (1M rows in 100 files by default for the large case; 10M with ``--full``),
  through the API (Arrow body for the upsert, a JSON key list for the delete). The raw
  limit is an *append* of the same 1,000 rows to another table of the same server:
  what landing those rows costs, so the ratio is what finding and deleting the old
  rows adds ("upserts as cheap as appends").
- **SuperTable side by side**: the same upsert and delete workload in SuperTable's SDK,
  in process, in its own virtual environment (``bench/supertable_side.py``), measured
  in the same run when ``BENCH_SUPERTABLE_PYTHON`` (default
  ``/work/supertable-venv/bin/python``) exists; the figure's "raw" is SuperTable's, so
  the ratio is ours over theirs.
- **Concurrent changes**: 16 clients, each upserting 50 times its own keys (spread over
  every file of a 1,000-row table, so that they share files but never keys), while two
  readers check that every read shows whole changes; through one ``serve`` process and
  through two on one Redis and storage. The figures: refused changes (target 0), reads
  that saw half a change (target 0), and changes per second (raw: the same number of
  appends from 16 clients).
- **Queries over deletion vectors**: after the upserts, count/sum over every row and
  a point lookup, against the same table compacted (its deletion vectors folded in):
  the ratio is the cost of merge-on-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.core import (
    ARROW,
    JSON,
    Measure,
    Server,
    _wait_ready,
    arrow_body,
    check,
    free_port,
    percentile,
    rows_table,
    stop_serve,
)

ORG, SUP = "bench", "u"
KEYS = 1_000
CHANGES = 10  # upserts (and deletes) per run
SUPERTABLE_PYTHON = os.environ.get("BENCH_SUPERTABLE_PYTHON", "/work/supertable-venv/bin/python")
SUPERTABLE_RAW = "SuperTable (SDK in process, no HTTP, data files not fsynced)"
# Compaction folds every deletion vector here: the "compacted" side of the query figure.
SERVER_ENV = {"LEDGERLAKE_COMPACT_DELETED_RATIO": "0.0001"}


def _url(table: str, suffix: str = "") -> str:
    return f"/v1/{ORG}/{SUP}/tables/{table}{suffix}"


def load(server: Server, table: str, rows: int, files: int) -> None:
    per = rows // files
    with server.client() as client:
        for i in range(files):
            data = arrow_body(rows_table(per, start=i * per))
            check(client.post(_url(table, "/rows"), content=data, headers={"Content-Type": ARROW}))


def changed_rows(keys: list[int], rnd: random.Random) -> pa.Table:
    """Rows for ``keys`` of the bench schema, with new amounts."""
    # (One batch: rows_table of each key alone would make a stream of 1,000 batches.)
    base = pa.concat_tables([rows_table(1, start=k) for k in keys]).combine_chunks()
    amounts = pa.array([rnd.random() * 100 for _ in keys], pa.float64())
    return base.set_column(base.schema.get_field_index("amount"), "amount", amounts)


def timed(client: Any, method: str, path: str, **kw: Any) -> float:
    started = time.perf_counter()
    check(client.request(method, path, **kw))
    return (time.perf_counter() - started) * 1000


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    large = 10_000_000 if full else 1_000_000
    upsert = _latency("upsert by key", "≤ 12 ms", lambda m: m.median <= 12)
    delete = _latency("delete by key", "≤ 12 ms", lambda m: m.median <= 12)
    upsert_large = _latency("upsert by key", "≤ 2x the 100k-row figure", None, rows=large)
    st_upsert = Measure(
        "upsert by key", f"{KEYS:,} random keys into 100k rows / 10 files, vs SuperTable",
        "p50", "ms", "lower", raw_label=SUPERTABLE_RAW,
        target="≤ 1/3 of SuperTable", check=lambda m: (m.ratio or 9) <= 1 / 3,
    )  # fmt: skip
    st_delete = Measure(
        "delete by key", f"{KEYS:,} random keys of 100k rows / 10 files, vs SuperTable",
        "p50", "ms", "lower", raw_label=SUPERTABLE_RAW,
    )  # fmt: skip
    scan = _query_measure("count and sum over 100k rows")
    point = _query_measure("point lookup")
    for r in range(runs):
        rnd = random.Random(r)
        ours_u, ours_d, appends = _changes(server, f"t{r}", 100_000, 10, rnd)
        upsert.add(percentile(ours_u, 50), percentile(appends, 50))
        delete.add(percentile(ours_d, 50), percentile(appends, 50))
        dv, compacted = _queries(server, f"t{r}", rnd)
        scan.add(dv[0], compacted[0])
        point.add(dv[1], compacted[1])
        big_u, _, big_appends = _changes(server, f"big{r}", large, 100, rnd, deletes=False)
        upsert_large.add(percentile(big_u, 50), percentile(big_appends, 50))
        theirs = _supertable(r)
        if theirs is not None:
            st_upsert.add(percentile(ours_u, 50), theirs["upsert_p50_ms"])
            st_delete.add(percentile(ours_d, 50), theirs["delete_p50_ms"])
    if upsert.values and upsert_large.values:
        ratio = upsert_large.median / upsert.median
        upsert_large.note = f"{ratio:.2f}x the 100k-row figure"
        upsert_large.check = lambda m: m.median <= 2 * upsert.median
    out = [upsert, delete, upsert_large, scan, point]
    if st_upsert.values:
        out += [st_upsert, st_delete]
    return out + _concurrent(server, runs, full)


def _query_measure(case: str) -> Measure:
    return Measure(
        "query over deletion vectors", case, "p50", "ms", "lower",
        raw_label="the same table compacted", target="≤ 1.3x",
        check=lambda m: (m.ratio or 9) <= 1.3,
    )  # fmt: skip


def _latency(scenario: str, target: str, ok: Any, rows: int = 100_000) -> Measure:
    files = 10 if rows == 100_000 else 100
    what = "into" if scenario.startswith("upsert") else "of"
    return Measure(
        scenario, f"{KEYS:,} random keys {what} {rows:,} rows / {files} files", "p50", "ms",
        "lower", raw_label=f"append of the same {KEYS:,} rows", target=target, check=ok,
    )  # fmt: skip


def _changes(
    server: Server, table: str, rows: int, files: int, rnd: random.Random, *, deletes: bool = True
) -> tuple[list[float], list[float], list[float]]:
    """Latencies (ms) of CHANGES upserts and deletes of KEYS random existing keys, and of
    appends of the same rows to another table."""
    load(server, table, rows, files)
    alive = list(range(rows))
    upserts, removals, appends = [], [], []
    with server.client() as client:
        for n in range(CHANGES):
            keys = rnd.sample(alive, KEYS)
            data = arrow_body(changed_rows(keys, rnd))
            headers = {"Content-Type": ARROW}
            upserts.append(
                timed(client, "POST", _url(table, "/rows?mode=upsert&key=id"), content=data,
                      headers=headers)
            )  # fmt: skip
            appends.append(
                timed(client, "POST", _url(f"{table}_append{n}", "/rows"), content=data,
                      headers=headers)
            )  # fmt: skip
        if deletes:
            gone: set[int] = set()
            for _ in range(CHANGES):
                keys = rnd.sample(sorted(set(alive) - gone), KEYS)
                gone.update(keys)
                body = json.dumps({"keys": {"id": keys}}).encode()
                removals.append(
                    timed(client, "POST", _url(table, "/delete"), content=body,
                          headers={"Content-Type": JSON})
                )  # fmt: skip
            detail = check(client.get(_url(table)))
            assert detail["row_count"] == rows - CHANGES * KEYS, detail
    return upserts, removals, appends


def _queries(server: Server, table: str, rnd: random.Random) -> tuple[list[float], list[float]]:
    """p50 (ms) of a scan and of a point lookup over ``table`` as it is (with deletion
    vectors), then after compacting it: ([scan, point] as is, [scan, point] compacted)."""
    keys = [rnd.randrange(100_000) for _ in range(50)]

    def measure(client: Any) -> list[float]:
        out = []
        for sql in (
            [f"SELECT count(*), sum(amount) FROM {table}"] * 50,
            [f"SELECT * FROM {table} WHERE id = {k}" for k in keys],
        ):
            body = {"sql": sql[0]}
            check(client.post(f"/v1/{ORG}/{SUP}/query", json=body))  # warm
            out.append(
                percentile(
                    [timed(client, "POST", f"/v1/{ORG}/{SUP}/query", json={"sql": s}) for s in sql],
                    50,
                )
            )
        return out

    with server.client() as client:
        files = check(
            client.get(_url(table, f"/versions/{check(client.get(_url(table)))['version']}"))
        )
        assert any(f["deleted_rows"] for f in files["files"]), "no deletion vectors to measure"
        before = check(
            client.post(
                f"/v1/{ORG}/{SUP}/query", json={"sql": f"SELECT count(*), sum(amount) FROM {table}"}
            )
        )
        as_is = measure(client)
        check(client.post(_url(table, "/compact")))
        version = check(client.get(_url(table)))["version"]
        files = check(client.get(_url(table, f"/versions/{version}")))["files"]
        assert not any(f["deleted_rows"] for f in files), "compaction left deletion vectors"
        after = check(
            client.post(
                f"/v1/{ORG}/{SUP}/query", json={"sql": f"SELECT count(*), sum(amount) FROM {table}"}
            )
        )
        (n_before, sum_before), (n_after, sum_after) = before["rows"][0], after["rows"][0]
        assert n_before == n_after and math.isclose(sum_before, sum_after), (before, after)
        compacted = measure(client)
    return as_is, compacted


def _supertable(seed: int) -> dict[str, Any] | None:
    """SuperTable's figures for the same workload, in its own environment (or None)."""
    script = Path(__file__).with_name("supertable_side.py")
    if not (Path(SUPERTABLE_PYTHON).exists() and script.exists()):
        return None
    done = subprocess.run(
        [SUPERTABLE_PYTHON, str(script), "--runs", str(CHANGES), "--seed", str(seed)],
        capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- concurrent changes -----------------------------------------------------------------

WRITERS, ROUNDS, GROUP, SEED_ROWS, SEED_FILES = 16, 50, 4, 1_000, 10
NEW = 100_000


def group(w: int) -> list[int]:
    return [w + WRITERS * j for j in range(GROUP)]


def _check_read(rows: list[list[Any]]) -> bool:
    """Whether a read shows whole changes: each writer's group shares one value, and the
    writer inserted exactly that many new keys."""
    values = {int(r[0]): int(r[1]) for r in rows}
    if len(values) != len(rows):
        return False
    for w in range(WRITERS):
        seen = {values[k] for k in group(w)}
        inserted = sum(1 for k in values if NEW + w * 1000 <= k < NEW + (w + 1) * 1000)
        if len(seen) != 1 or inserted != seen.pop():
            return False
    return True


@contextlib.contextmanager
def second_server(server: Server) -> Iterator[str]:
    """Another ``ledgerlake serve`` on the same Redis and data directory: its URL."""
    port = free_port()
    log = server.root / "serve-2.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from app.cli.main import main; raise SystemExit(main())",
             "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(server.data_dir)],
            env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, process, log)
        yield base
    finally:
        stop_serve(process)


def _concurrent(server: Server, runs: int, full: bool) -> list[Measure]:
    out: list[Measure] = []
    for processes in (1, 2):
        case = f"{WRITERS} clients x {ROUNDS} upserts of disjoint keys, one table, " + (
            "1 serve process" if processes == 1 else "2 serve processes"
        )
        refused = Measure("concurrent changes", case, "refused", "changes", "lower",
                          target="0", check=lambda m: max(m.values) == 0)  # fmt: skip
        partial = Measure("concurrent changes", case, "partial reads", "reads", "lower",
                          target="0", check=lambda m: max(m.values) == 0)  # fmt: skip
        rate = Measure("concurrent changes", case, "throughput", "changes/s", "higher",
                       raw_label=f"{WRITERS * ROUNDS} appends from {WRITERS} clients")  # fmt: skip
        for r in range(runs):
            with contextlib.ExitStack() as stack:
                bases = [server.base]
                if processes == 2:
                    bases.append(stack.enter_context(second_server(server)))
                result = asyncio.run(_race(server, bases, f"c{processes}_{r}"))
            refused.add(result["refused"])
            partial.add(result["partial"])
            rate.add(result["rate"], result["raw_rate"])
            if result["reads"] < 10:
                partial.note = f"only {result['reads']} reads overlapped the writes"
        out += [refused, partial, rate]
    return out


async def _race(server: Server, bases: list[str], table: str) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": server.client().headers["Authorization"]}
    clients = [
        httpx.AsyncClient(base_url=b, headers=headers, timeout=300,
                          limits=httpx.Limits(max_connections=64))
        for b in bases
    ]  # fmt: skip
    url = f"/v1/{ORG}/{SUP}/tables/{table}"
    try:
        for f in range(SEED_FILES):
            seed = [{"id": k, "v": 0} for k in range(SEED_ROWS) if k % SEED_FILES == f]
            check(await clients[0].post(f"{url}/rows", json=seed))
        refused: list[str] = []
        reads = [0, 0]
        done = asyncio.Event()

        async def writer(w: int) -> None:
            client = clients[w % len(clients)]
            for r in range(1, ROUNDS + 1):
                rows = [{"id": k, "v": r} for k in group(w)] + [{"id": NEW + w * 1000 + r, "v": r}]
                response = await client.post(f"{url}/rows?mode=upsert&key=id", json=rows)
                if response.status_code != 200:
                    refused.append(f"{response.status_code} {response.text[:200]}")
                    return

        async def reader(n: int) -> None:
            client = clients[n % len(clients)]
            while not done.is_set():
                body = check(await client.post(
                    f"/v1/{ORG}/{SUP}/query",
                    json={"sql": f"SELECT id, v FROM {table}", "limit": 100_000},
                ))  # fmt: skip
                reads[0] += 1
                reads[1] += 0 if _check_read(body["rows"]) else 1

        async def writers() -> float:
            started = time.perf_counter()
            try:
                await asyncio.gather(*(writer(w) for w in range(WRITERS)))
            finally:
                done.set()
            return time.perf_counter() - started

        took, *_ = await asyncio.gather(writers(), reader(0), reader(1))
        final = check(await clients[-1].post(
            f"/v1/{ORG}/{SUP}/query", json={"sql": f"SELECT id, v FROM {table}", "limit": 100_000}
        ))  # fmt: skip
        expected = {k: 0 for k in range(SEED_ROWS)}
        for w in range(WRITERS):
            expected.update({k: ROUNDS for k in group(w)})
            expected.update({NEW + w * 1000 + r: r for r in range(1, ROUNDS + 1)})
        if not refused:
            got = {int(r[0]): int(r[1]) for r in final["rows"]}
            assert got == expected, "the final rows are not the model's"
        # The raw side: as many appends of the same size from as many clients.
        started = time.perf_counter()

        async def appender(w: int) -> None:
            client = clients[w % len(clients)]
            for r in range(ROUNDS):
                rows = [{"id": 10_000_000 + w * 1000 + r, "v": r}] * (GROUP + 1)
                check(await client.post(f"{url}_raw/rows", json=rows))

        check(await clients[0].post(f"{url}_raw/rows", json=[{"id": -1, "v": 0}]))
        await asyncio.gather(*(appender(w) for w in range(WRITERS)))
        raw_took = time.perf_counter() - started
        changes = WRITERS * ROUNDS - len(refused)
        return {
            "refused": len(refused),
            "partial": reads[1],
            "reads": reads[0],
            "rate": changes / took,
            "raw_rate": WRITERS * ROUNDS / raw_took,
        }
    finally:
        for c in clients:
            await c.aclose()
