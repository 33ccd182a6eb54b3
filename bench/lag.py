"""Projection lag and mirror lag under sustained ingest.

One client writes 1,000-row Arrow batches at a steady rate (10 writes/s for 30 s; 60 s
with ``--full``) to a table published as Delta and Iceberg. For every write, the lag of
a projection is the time from the write's acknowledgement until that projection's
checkpoint (``catalog``, ``mirror-delta``, ``mirror-iceberg``) has passed the write's
event, watched in Redis every 2 ms. A mirror's checkpoint moves in the same atomic step
that records the table as published, after the Delta or Iceberg commit is on storage.

The raw limit is the delivery floor: how long a raw consumer blocked in ``XREADGROUP``
takes to see an entry from the moment its ``XADD`` is sent, on the same Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time

import redis

from bench.core import ARROW, Measure, Server, arrow_body, check, percentile, rows_table
from events.model import stream_id_tuple
from events.redis_log import Keys

PROJECTIONS = ("catalog", "mirror-delta", "mirror-iceberg")


class Watcher(threading.Thread):
    """Polls the checkpoints and records when each first passes each awaited id."""

    def __init__(self, server: Server, org: str, sup: str) -> None:
        super().__init__(daemon=True)
        keys = Keys(server.settings().redis_prefix)
        self.keys = [keys.checkpoint(org, sup, p) for p in PROJECTIONS]
        self.client = server.raw_redis()
        self.awaited: list[tuple[tuple[int, int], float]] = []  # (event id, acked at)
        self.seen: dict[tuple[str, int], float] = {}
        self.stop = threading.Event()
        self.done = threading.Event()  # no more ids will be awaited
        self.lock = threading.Lock()

    def expect(self, event_id: str, acked_at: float) -> None:
        with self.lock:
            self.awaited.append((stream_id_tuple(event_id), acked_at))

    def run(self) -> None:
        while not self.stop.is_set():
            values = self.client.mget(self.keys)
            now = time.perf_counter()
            with self.lock:
                awaited = list(enumerate(self.awaited))
            for p, value in zip(PROJECTIONS, values, strict=True):
                if value is None:
                    continue
                position = stream_id_tuple(value.decode())
                for i, (event, _) in awaited:
                    if (p, i) not in self.seen and position >= event:
                        self.seen[(p, i)] = now
            if len(self.seen) == len(PROJECTIONS) * len(awaited) and self.done.is_set():
                return
            self.stop.wait(0.002)

    def lags(self, projection: str) -> list[float]:
        missing = sum((projection, i) not in self.seen for i in range(len(self.awaited)))
        if missing:
            raise RuntimeError(f"{projection}: {missing} writes never applied within 120 s")
        return [
            (self.seen[(projection, i)] - acked) * 1000 for i, (_, acked) in enumerate(self.awaited)
        ]


def _raw_floor(server: Server, count: int = 200) -> list[float]:
    """XADD → XREADGROUP (blocking) delivery, in ms, ``count`` times."""
    stream = "bench:lag:raw"
    writer = server.raw_redis()
    # One connection, so that its id is the one that blocks.
    reader = redis.Redis(
        unix_socket_path=str(server.embedded.socket), single_connection_client=True
    )
    reader.xgroup_create(stream, "g", id="0", mkstream=True)
    reader_id = reader.client_id()
    latencies: list[float] = []
    try:
        for _ in range(count):
            box: list[float] = []

            def consume(box: list[float] = box) -> None:
                reader.xreadgroup("g", "c", {stream: ">"}, count=1, block=5000)
                box.append(time.perf_counter())

            thread = threading.Thread(target=consume)
            thread.start()
            while b"flags=b" not in writer.execute_command("CLIENT", "LIST", "ID", reader_id):
                time.sleep(0.0005)  # until the consumer is blocked in XREADGROUP
            sent = time.perf_counter()
            writer.xadd(stream, {"e": b"x" * 700})
            thread.join()
            latencies.append((box[0] - sent) * 1000)
    finally:
        writer.delete(stream)
        writer.close()
        reader.close()
    return latencies


def _sustained(server: Server, sup: str, rate: float, seconds: float) -> Watcher:
    data = arrow_body(rows_table(1000))
    path = f"/v1/bench/{sup}/tables/t/rows"
    with server.client() as client:
        check(client.post(path, content=data, headers={"Content-Type": ARROW}))
    watcher = Watcher(server, "bench", sup)
    watcher.start()

    async def write() -> None:
        async with server.async_client() as client:
            started = time.perf_counter()
            pending = []
            for n in range(int(rate * seconds)):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the steady rate of the load
                pending.append(asyncio.create_task(one(client)))
            await asyncio.gather(*pending)

    async def one(client: object) -> None:
        response = await client.post(  # type: ignore[attr-defined]
            path, content=data, headers={"Content-Type": ARROW}
        )
        acked = time.perf_counter()
        watcher.expect(check(response)["event_id"], acked)

    asyncio.run(write())
    watcher.done.set()
    watcher.join(timeout=120)
    watcher.stop.set()
    watcher.client.close()
    return watcher


def run(server: Server, runs: int, full: bool) -> list[Measure]:
    seconds = 60.0 if full else 30.0
    rate = 10.0
    case = f"{rate:g} writes/s x 1,000 rows, {seconds:g} s"
    measures = {
        (p, q): Measure(
            "lag",
            f"{p}, {case}",
            f"p{q}",
            "ms",
            "lower",
            raw_label="XADD→XREADGROUP",
            target="≤ 2 s" if p != "catalog" and q == 99 else "",
            check=(lambda m: m.median <= 2000) if p != "catalog" and q == 99 else None,
        )
        for p in PROJECTIONS
        for q in (50, 99)
    }
    for run in range(runs):
        watcher = _sustained(server, f"lag{run}", rate, seconds)
        floor = _raw_floor(server)
        for p in PROJECTIONS:
            lags = watcher.lags(p)
            for q in (50, 99):
                measures[(p, q)].add(percentile(lags, q), percentile(floor, q))
    return list(measures.values())
