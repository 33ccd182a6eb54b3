"""What every benchmark shares: a real redis-server and a real ``ledgerlake serve``
process, the data sets, the statistics and the result records.

The server under test is a subprocess started exactly as a user starts it
(``ledgerlake serve``), against a redis-server started the way the embedded default
starts one (``appendonly yes``, ``appendfsync always``, a Unix socket). The benchmark
process is the client, and also measures each raw limit itself, in the same run, on the
same disk and the same Redis.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import redis

from app.ops.embedded_redis import EmbeddedRedis
from app.settings import Settings

TOKEN = "bench-admin-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
JSON = "application/json"
DEFAULTS = Settings()


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Measure:
    """One figure over several runs: ``values[i]`` and ``raw[i]`` come from run ``i``.

    ``better`` says which way is good ("higher" for throughput, "lower" for latency);
    the ratio is ours over raw in both cases, so a throughput ratio of 0.8 is 80% of the
    limit and a latency ratio of 2.0 is twice the limit. ``overhead`` (latency only) is
    ours minus raw, per run.
    """

    scenario: str
    case: str
    metric: str
    unit: str
    better: str
    values: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    raw_label: str = ""
    target: str = ""
    check: Callable[[Measure], bool] | None = None
    note: str = ""

    def add(self, value: float, raw: float | None = None) -> None:
        self.values.append(value)
        if raw is not None:
            self.raw.append(raw)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def raw_median(self) -> float | None:
        return statistics.median(self.raw) if self.raw else None

    @property
    def ratios(self) -> list[float]:
        return [v / r for v, r in zip(self.values, self.raw, strict=False) if r]

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def overhead(self) -> float | None:
        if not self.raw:
            return None
        return statistics.median(v - r for v, r in zip(self.values, self.raw, strict=False))

    @property
    def met(self) -> bool | None:
        return self.check(self) if self.check and self.values else None

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "case": self.case,
            "metric": self.metric,
            "unit": self.unit,
            "better": self.better,
            "values": self.values,
            "raw": self.raw,
            "raw_label": self.raw_label,
            "median": self.median if self.values else None,
            "raw_median": self.raw_median,
            "ratio": self.ratio,
            "overhead": self.overhead,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown(measures: Sequence[Measure]) -> str:
    head = (
        "| scenario | case | metric | median | spread (min-max) | raw limit (median) "
        "| ratio to raw | target | met |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m in measures:
        if not m.values:
            continue
        spread = f"{fmt(min(m.values))}-{fmt(max(m.values))}"
        raw = f"{fmt(m.raw_median)} {m.unit} ({m.raw_label})" if m.raw else ""
        ratio = ""
        if m.ratio is not None:
            ratio = f"{m.ratio:.0%}" if m.better == "higher" else f"{m.ratio:.2f}x"
            if m.better == "lower" and m.overhead is not None:
                sign = "+" if m.overhead >= 0 else ""
                ratio += f" ({sign}{fmt(m.overhead)} {m.unit})"
        met = {True: "yes", False: "**no**", None: ""}[m.met]
        lines.append(
            f"| {m.scenario} | {m.case} | {m.metric} | {fmt(m.median)} {m.unit} | {spread} "
            f"| {raw} | {ratio} | {m.target} | {met} |"
        )
    notes = [f"- {m.scenario}, {m.case}: {m.note}" for m in measures if m.note and m.values]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


# -- data -------------------------------------------------------------------------------

REGIONS = ["eu", "us", "apac", "latam", "mea"]
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def _cycle(block: pa.Array, n: int, offset: int) -> pa.ChunkedArray:
    """``block`` repeated: element ``i`` is ``block[(offset + i) % len(block)]``."""
    offset %= len(block)
    copies = (offset + n) // len(block) + 1
    return pa.chunked_array([block] * copies).slice(offset, n)


# Each block's length is a multiple of its period, so that block[i % len] is the value
# of row i; the blocks are long, so that a large table is a few hundred chunks.
NAMES = pa.array([f"customer-{i:05d}" for i in range(50_000)])
AMOUNTS = pa.array([(i * 37 % 10_000) / 100 for i in range(50_000)])
REGION_BLOCK = pa.array([REGIONS[i % 5] for i in range(50_000)])
QTYS = pa.array([i % 17 for i in range(17 * 3000)], pa.int32())


def rows_table(n: int, start: int = 0) -> pa.Table:
    """``n`` rows of an orders-like table: ids ``start..start+n-1`` (unique), a
    timestamp (one per second from 2026-01-01), a name (50,000 distinct), an amount, a
    region (5 values) and a quantity; row ``i`` is the same whatever the batch."""
    ids = pa.array(range(start, start + n), pa.int64())
    epoch_us = int(EPOCH.timestamp()) * 1_000_000
    ts = pc.add(pc.multiply(ids, 1_000_000), epoch_us).cast(pa.timestamp("us", "UTC"))
    return pa.table(
        {
            "id": ids,
            "ts": ts,
            "name": _cycle(NAMES, n, start),
            "amount": _cycle(AMOUNTS, n, start),
            "region": _cycle(REGION_BLOCK, n, start),
            "qty": _cycle(QTYS, n, start),
        }
    ).combine_chunks()


def arrow_body(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def parquet_body(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def json_body(table: pa.Table) -> bytes:
    rows = table.to_pylist()
    for row in rows:
        row["ts"] = row["ts"].isoformat()
    return json.dumps(rows).encode()


def body(table: pa.Table, kind: str) -> tuple[bytes, str]:
    if kind == "arrow":
        return arrow_body(table), ARROW
    if kind == "parquet":
        return parquet_body(table), PARQUET
    return json_body(table), JSON


def raw_parquet_write(table: pa.Table, path: Path, settings: Settings = DEFAULTS) -> float:
    """The raw limit of ingest: pyarrow writing ``table`` as Parquet, with the options the
    server uses, to ``path`` (fsync'd, as the server's file is), in seconds."""
    started = time.perf_counter()
    with open(path, "wb") as fh:
        pq.write_table(
            table,
            fh,
            compression="zstd",
            compression_level=settings.zstd_level,
            row_group_size=settings.row_group_rows,
        )
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - started


# -- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def reset_peak_rss(pid: int) -> float:
    """Start a new peak (writing 5 to clear_refs resets VmHWM to the current RSS);
    returns that RSS in MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_mb(pid)


@dataclass
class Server:
    """A ``ledgerlake serve`` subprocess and the redis-server it uses."""

    root: Path
    embedded: EmbeddedRedis
    process: subprocess.Popen[bytes]
    base: str
    env: dict[str, str]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def files(self) -> Path:
        return self.data_dir / "files"

    def client(self, timeout: float = 300.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def async_client(self, timeout: float = 300.0, connections: int = 64) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            timeout=timeout,
            headers={"Authorization": f"Bearer {TOKEN}"},
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def raw_redis(self) -> Any:
        """A plain client of the server's Redis (typed Any: redis-py types every reply
        as a union that the benchmarks would only cast away)."""
        return redis.Redis(unix_socket_path=str(self.embedded.socket))

    def settings(self) -> Settings:
        """The server's settings, for code the benchmark runs in process (replay)."""
        return Settings.from_env(self.env)


def _wait_ready(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=base, timeout=2) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not become ready:\n{log.read_text()}")
            time.sleep(0.05)  # polling a child process's port until it listens


@contextmanager
def serve(
    root: Path | None = None, env: Mapping[str, str] | None = None, *, keep: bool = False
) -> Iterator[Server]:
    """Start a redis-server and ``ledgerlake serve`` in ``root`` (a new temporary
    directory by default) and stop both on exit, by their process ids.

    ``env`` adds ``LEDGERLAKE_*`` settings. By default the server publishes no mirrors,
    archives nothing and rate-limits nobody, so that each benchmark measures its own path;
    the lag benchmark turns mirrors on.
    """
    made = root is None
    root = Path(tempfile.mkdtemp(prefix="ll-bench-")) if root is None else root
    (root / "data").mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedRedis(root / "data", appendfsync=DEFAULTS.redis_appendfsync)
    url = embedded.start()
    port = free_port()
    full_env = {
        **os.environ,
        "LEDGERLAKE_REDIS_URL": url,
        "LEDGERLAKE_API_TOKEN": TOKEN,
        "LEDGERLAKE_MIRRORS": "none",
        "LEDGERLAKE_ARCHIVE": "false",
        "LEDGERLAKE_RATE_LIMIT_PER_S": "1000000",
        "LEDGERLAKE_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    log = root / "serve.log"
    # The code of the checkout the benchmark runs from (not whichever one the
    # environment installed): a worktree of an older commit benchmarks that commit.
    full_env["PYTHONPATH"] = str(ROOT)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from app.cli.main import main; raise SystemExit(main())",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(root / "data"),
            ],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    server = Server(root, embedded, process, base, full_env)
    try:
        _wait_ready(base, process, log)
        yield server
    finally:
        stop_serve(process)
        if embedded.process is not None:
            embedded.process.terminate()
            embedded.process.wait(timeout=30)
        if made and not keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    """Stop a ``serve`` process as Ctrl-C does (killed if it takes over a minute)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: "
            f"{response.status_code} {response.text[:500]}"
        )
    return response.json() if response.content else None


def post_body(client: httpx.Client, path: str, data: bytes, content_type: str) -> Any:
    return check(client.post(path, content=data, headers={"Content-Type": content_type}))


def table_files(server: Server, org: str, sup: str, table: str) -> list[str]:
    """The Parquet files of a table's current version, as local paths."""
    with server.client() as client:
        detail = check(client.get(f"/v1/{org}/{sup}/tables/{table}"))
        version = check(client.get(f"/v1/{org}/{sup}/tables/{table}/versions/{detail['version']}"))
    return [str(server.files / f["path"]) for f in version["files"] if not f["inline"]]


def wait_for_checkpoint(
    server: Server, org: str, sup: str, projection: str, timeout_s: float = 600
) -> None:
    """Wait until ``projection`` (``catalog``, ``mirror-delta``...) has applied every
    entry of the super's stream, so that it does not compete with what comes next."""
    from events.redis_log import Keys

    keys = Keys(server.settings().redis_prefix)
    raw = server.raw_redis()
    deadline = time.monotonic() + timeout_s
    try:
        last = raw.xrevrange(keys.stream(org, sup), count=1)[0][0]
        while (raw.get(keys.checkpoint(org, sup, projection)) or b"0-0") != last:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{projection} of {org}/{sup} did not catch up")
            time.sleep(0.05)  # polling another process's progress
    finally:
        raw.close()


def append_copies(
    server: Server,
    org: str,
    sup: str,
    tables: Sequence[str],
    count: int,
    *,
    copy_files: bool = False,
    compact_every: int = 0,
) -> None:
    """Append ``count`` copies of the super's last ``RowsAppended`` event, spread over
    ``tables`` (which exist), each with the table's next version and a new file name:
    a log as the API would write it, made in seconds instead of hours. With
    ``copy_files`` each new name is a real copy of the template's file. With
    ``compact_every``, every that many appends to a table are followed by a
    ``TableCompacted`` event merging its files into one, as compaction would (a table
    then holds at most that many files)."""
    import shutil
    import uuid

    import msgspec

    from events.model import RowsAppended, TableCompacted, decode_event, encode_event
    from events.redis_log import Keys

    keys = Keys(server.settings().redis_prefix)
    stream = keys.stream(org, sup)
    raw = server.raw_redis()
    try:
        entries = raw.xrevrange(stream, count=1)
        template = decode_event(*entries[0])
        assert isinstance(template, RowsAppended), template
        source = template.files[0]
        stored = raw.hmget(keys.versions(org, sup), list(tables))
        versions = {t: int(v) for t, v in zip(tables, stored, strict=True)}
        current: dict[str, list[Any]] = {t: [] for t in tables}
        done, batch = 0, 2000
        while done < count:
            pipe = raw.pipeline(transaction=False)
            step = min(batch, count - done)
            for n in range(step):
                table = tables[(done + n) % len(tables)]
                versions[table] += 1
                path = f"{org}/{sup}/{table}/data/{uuid.uuid4().hex}.parquet"
                if copy_files:
                    shutil.copyfile(server.files / source.path, server.files / path)
                file = msgspec.structs.replace(source, path=path)
                event: Any = msgspec.structs.replace(
                    template, table=table, version=versions[table], files=(file,)
                )
                current[table].append(file)
                if compact_every and len(current[table]) >= compact_every:
                    pipe.xadd(stream, encode_event(event))
                    versions[table] += 1
                    merged = msgspec.structs.replace(
                        source,
                        path=f"{org}/{sup}/{table}/data/{uuid.uuid4().hex}.parquet",
                        rows=sum(f.rows for f in current[table]),
                        size_bytes=sum(f.size_bytes for f in current[table]),
                    )
                    event = TableCompacted(
                        org=org, super_=sup, table=table, version=versions[table],
                        actor="ledgerlake", time=template.time, files=(merged,),
                        removed_files=tuple(f.path for f in current[table]),
                        rows=merged.rows,
                    )  # fmt: skip
                    current[table] = [merged]
                pipe.xadd(stream, encode_event(event))
            pipe.hset(keys.versions(org, sup), mapping=versions)
            pipe.execute()
            done += step
    finally:
        raw.close()
