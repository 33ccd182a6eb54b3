"""Single-row write latency, and concurrent writers, against raw XADD.

Every write is acknowledged durably: the server's Redis runs ``appendfsync always``,
so an acknowledged event is on disk. The raw limit is an ``XADD`` of an entry of the
same size to the same Redis (same fsync policy), from the same client machine, at the
same concurrency.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis

from bench.core import JSON, Measure, Server, percentile

SINGLE = json.dumps([{"id": 1, "name": "one", "amount": 1.5, "region": "eu"}]).encode()
RAW_ENTRY = b"x" * 700  # about the size of a one-row RowsAppended event with its batch


async def timed_writes(
    server: Server, paths: list[str], concurrency: int, failed: list[str] | None = None
) -> list[float]:
    """Post ``SINGLE`` to each path, ``concurrency`` at a time; the latencies in ms of
    the acknowledged ones. A refused write raises, or, given ``failed``, is recorded
    there (its status and error code)."""
    latencies: list[float] = []
    queue = list(reversed(paths))
    async with server.async_client(connections=concurrency) as client:

        async def worker() -> None:
            while queue:
                path = queue.pop()
                started = time.perf_counter()
                response = await client.post(path, content=SINGLE, headers={"Content-Type": JSON})
                took = (time.perf_counter() - started) * 1000
                if response.status_code == 200:
                    latencies.append(took)
                elif failed is not None:
                    failed.append(f"{response.status_code} {response.json()['error']['code']}")
                else:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def raw_xadds(server: Server, count: int, concurrency: int, streams: int) -> list[float]:
    client = aioredis.Redis(unix_socket_path=str(server.embedded.socket))
    latencies: list[float] = []
    remaining = [count]
    try:

        async def worker(n: int) -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                started = time.perf_counter()
                await client.xadd(f"bench:raw:{n % streams}", {"e": RAW_ENTRY})
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        await client.delete(*(f"bench:raw:{n}" for n in range(streams)))
    finally:
        await client.aclose()
    return latencies


DEFAULT_ENV = {"LEDGERLAKE_MIRRORS": "delta,iceberg", "LEDGERLAKE_ARCHIVE": "true"}


def run_defaults(server: Server, runs: int, full: bool) -> list[Measure]:
    """Single-row writes with the default settings: each write is also published to
    its Delta and Iceberg mirrors, and archived, by the same process."""
    return _single(server, runs, 1000 if full else 300, "default settings (mirrors, archive)")


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    measures = _single(server, runs, 3000 if full else 500, "no mirrors")
    return measures + _concurrent(server, runs, full)


def _single(server: Server, runs: int, count: int, label: str) -> list[Measure]:
    p50 = Measure(
        "single-row write", f"1 row, JSON, durable ack, {label}", "p50", "ms", "lower",
        raw_label="XADD, appendfsync always", target="≤ 2.5 ms",
        check=lambda m: m.median <= 2.5,
    )  # fmt: skip
    p99 = Measure(
        "single-row write", f"1 row, JSON, durable ack, {label}", "p99", "ms", "lower",
        raw_label="XADD, appendfsync always", target="≤ 10 ms",
        check=lambda m: m.median <= 10,
    )  # fmt: skip
    for run in range(runs):
        # The first write creates the table; it is not a single-row append.
        path = f"/v1/bench/w/tables/single{run}/rows"
        asyncio.run(timed_writes(server, [path], 1))
        ours = asyncio.run(timed_writes(server, [path] * count, 1))
        raw = asyncio.run(raw_xadds(server, count, 1, 1))
        p50.add(percentile(ours, 50), percentile(raw, 50))
        p99.add(percentile(ours, 99), percentile(raw, 99))
    return [p50, p99]


def _concurrent(server: Server, runs: int, full: bool) -> list[Measure]:
    measures: list[Measure] = []
    total = 2000 if full else 400
    for layout in ("one table", "separate tables"):
        for writers in (1, 4, 16):
            case = f"{writers} writer{'s' if writers > 1 else ''}, {layout}"
            rate = Measure(
                "concurrent writers", case, "throughput", "writes/s", "higher",
                raw_label=f"XADD x{writers}",
            )  # fmt: skip
            p95 = Measure(
                "concurrent writers", case, "p95", "ms", "lower", raw_label=f"XADD x{writers}"
            )
            for run in range(runs):
                tag = f"c{writers}_{layout[0]}_{run}"
                names = [f"{tag}_{i}" for i in range(writers if layout != "one table" else 1)]
                created = [f"/v1/bench/w/tables/{name}/rows" for name in names]
                asyncio.run(timed_writes(server, created, len(created)))
                paths = [created[i % len(created)] for i in range(total)]
                started = time.perf_counter()
                failed: list[str] = []
                ours = asyncio.run(timed_writes(server, paths, writers, failed))
                took = time.perf_counter() - started
                if failed:
                    rate.note += f"run {run}: {len(failed)} of {total} writes refused " + (
                        f"({', '.join(sorted(set(failed)))}); "
                    )
                started = time.perf_counter()
                raw = asyncio.run(raw_xadds(server, total, writers, len(names)))
                raw_took = time.perf_counter() - started
                rate.add(len(ours) / took, total / raw_took)
                p95.add(percentile(ours, 95), percentile(raw, 95))
            measures += [rate, p95]
    return measures
