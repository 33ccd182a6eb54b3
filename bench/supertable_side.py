"""SuperTable's side of the upsert/delete-by-key comparison (bench/upserts.py).

What it measures
    SuperTable (https://github.com/kladnasoft/supertable) doing the same change-by-key
    workload as Ledgerlake's ``bench/upserts.py``, through its Python SDK:

    1. a table of ``--rows`` rows (default 100,000) written as ``--files`` batches
       (default 10) of ``id int64`` (0..rows-1, unique), ``name string``,
       ``amount float64``, ``region string``: one Parquet data file per batch, unless
       SuperTable's automatic small-file compaction merges some (it does at 10M rows:
       "files" in the output is the count of data files SuperTable kept);
    2. ``--runs`` times (default 10) an upsert of ``--keys`` (default 1,000) random
       existing ids with new ``name``/``amount``:
       ``DataWriter.write(..., overwrite_columns=["id"])``, SuperTable's merge-by-key;
    3. ``--runs`` times a delete of ``--keys`` random still-present ids:
       ``DataWriter.write(..., overwrite_columns=["id"], delete_only=True)`` with a
       one-column (``id``) Arrow table, SuperTable's delete-by-key.

    Each ``write()`` call alone is timed with ``time.perf_counter`` (building the Arrow
    input is not). After the upserts, and again after the deletes, the result is
    checked through SuperTable's query API (``DataReader.execute``): row count,
    distinct ids, the latest values of sampled upserted ids, absence of deleted ids.
    The file layout (SuperTable's snapshot ``resources``) is recorded before and after,
    which shows whether a change rewrites existing files (it does not: SuperTable
    appends the new rows as a new file and tombstones the old row ids in a deletion
    vector, merge-on-read).

How it is run
    With SuperTable's own virtual environment, never Ledgerlake's (this file imports
    nothing from the Ledgerlake repository)::

        /work/supertable-venv/bin/python bench/supertable_side.py [--runs N] [--rows N]

    (also ``--files``, ``--keys``, ``--seed``, ``--keep``). It prints one JSON object
    on one line to stdout, the last line; SuperTable's own logging goes to stderr.

How SuperTable is installed
    ``python3 -m venv /work/supertable-venv && /work/supertable-venv/bin/pip install
    supertable==3.4.3`` (from PyPI; this script reports the version it imported).

What the comparison is, honestly
    In process with SuperTable's SDK: no HTTP, no server, no network hop (Ledgerlake's
    side goes through its HTTP API). Storage is SuperTable's LOCAL backend in a fresh
    temporary directory; its catalog, locks and row-id counters are in a redis-server
    this script starts on 127.0.0.1 (a free port, ``--save '' --appendonly no``, so
    Redis never touches the disk; binary ``/work/main/.venv/bin/redis-server`` or
    ``$BENCH_REDIS_SERVER``) and stops by its pid at the end. Durability: the
    Parquet data and deletion-vector files are written without fsync, but SuperTable's
    LocalStorage ``write_json`` fsyncs the snapshot JSON (file and directory) once per
    commit, as shipped; this script leaves that in place and only counts it (the
    ``fsync`` figures in the output), so "no fsync" holds for the data files, not for
    that one small metadata file per change. SuperTable's defaults are kept otherwise
    (monitoring enqueue to Redis on, audit off, DuckDB engine for the queries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis

REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER", "/work/main/.venv/bin/redis-server")
REDIS_START_DEADLINE_S = 15.0
ORGANIZATION = "bench-org"
SUPER_NAME = "bench"
TABLE = "orders"
ROLE = "superadmin"
REGIONS = ("north", "south", "east", "west", "central")
VERIFY_SAMPLE = 50


# -- redis ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """A private redis-server on 127.0.0.1 with nothing persisted; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_redis(proc, port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_redis(proc: subprocess.Popen[bytes], port: int) -> None:
    """Poll PING until it answers, the server exits, or the deadline passes."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + REDIS_START_DEADLINE_S
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer PING in time")
            # Waiting on the process (not sleeping) paces the poll and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=0.02)
                raise RuntimeError(f"redis-server exited with code {code} before answering")
    finally:
        client.close()


# -- fsync accounting (observes SuperTable's own fsyncs, changes nothing) --------------


@dataclass
class FsyncCounter:
    calls: int = 0
    seconds: float = 0.0

    def install(self) -> None:
        real_fsync = os.fsync

        def counted_fsync(fd: Any) -> None:
            started = time.perf_counter()
            try:
                real_fsync(fd)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - started

        os.fsync = counted_fsync

    def snapshot(self) -> tuple[int, float]:
        return self.calls, self.seconds


# -- data ----------------------------------------------------------------------------


def region_of(row_id: int) -> str:
    return REGIONS[row_id % len(REGIONS)]


def base_rows(start: int, count: int) -> pa.Table:
    ids = range(start, start + count)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "name": pa.array([f"name-{i % 50_000}" for i in ids], pa.string()),
            "amount": pa.array([(i % 10_000) / 100.0 for i in ids], pa.float64()),
            "region": pa.array([region_of(i) for i in ids], pa.string()),
        }
    )


def upsert_rows(keys: list[int], run: int, rnd: random.Random) -> tuple[pa.Table, dict[int, Any]]:
    """New name/amount for ``keys`` (region unchanged) and the values expected after."""
    names = [f"upserted-{run}-{k}" for k in keys]
    amounts = [round(rnd.random() * 1000, 2) for _ in keys]
    table = pa.table(
        {
            "id": pa.array(keys, pa.int64()),
            "name": pa.array(names, pa.string()),
            "amount": pa.array(amounts, pa.float64()),
            "region": pa.array([region_of(k) for k in keys], pa.string()),
        }
    )
    expected = {k: (n, a) for k, n, a in zip(keys, names, amounts, strict=True)}
    return table, expected


def key_rows(keys: list[int]) -> pa.Table:
    return pa.table({"id": pa.array(keys, pa.int64())})


# -- SuperTable ----------------------------------------------------------------------


def configure_supertable_env(home: Path, redis_port: int) -> None:
    """SuperTable reads its settings from the environment once, at import time."""
    os.environ.update(
        {
            "STORAGE_TYPE": "LOCAL",
            "SUPERTABLE_HOME": str(home),
            "SUPERTABLE_REDIS_HOST": "127.0.0.1",
            "SUPERTABLE_REDIS_PORT": str(redis_port),
            "SUPERTABLE_REDIS_DB": "0",
            "SUPERTABLE_REDIS_PASSWORD": "",
            "SUPERTABLE_REDIS_SENTINEL": "false",
            "SUPERTABLE_REDIS_URL": "",
            "SUPERTABLE_LOG_LEVEL": "WARNING",
            "SUPERTABLE_LOG_FILE": "none",
        }
    )


@dataclass
class Layout:
    files: list[str]
    rows_per_file: list[int]
    tombstone_rows: int


@dataclass
class Results:
    upsert_ms: list[float] = field(default_factory=list)
    delete_ms: list[float] = field(default_factory=list)
    upsert_counts: list[tuple[int, int]] = field(default_factory=list)
    delete_counts: list[tuple[int, int]] = field(default_factory=list)
    fsyncs_per_upsert: list[int] = field(default_factory=list)
    fsync_ms_per_upsert: list[float] = field(default_factory=list)
    fsyncs_per_delete: list[int] = field(default_factory=list)
    fsync_ms_per_delete: list[float] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


class SuperTableBench:
    def __init__(self, fsync: FsyncCounter) -> None:
        # Imported here: the environment must be set first (settings are read on import).
        import supertable
        from supertable import DataReader, DataWriter, SimpleTable, SuperTable, engine

        self.version: str = supertable.__version__
        self._reader_cls = DataReader
        self._engine = engine.AUTO
        self._simple_table_cls = SimpleTable
        self.super_table = SuperTable(super_name=SUPER_NAME, organization=ORGANIZATION)
        self.writer = DataWriter(super_name=SUPER_NAME, organization=ORGANIZATION)
        self.fsync = fsync

    def write(self, data: pa.Table, *, delete_only: bool = False) -> tuple[float, int, int]:
        """One timed ``DataWriter.write`` by key ``id``; (ms, inserted, deleted)."""
        started = time.perf_counter()
        _, _, inserted, deleted = self.writer.write(
            role_name=ROLE,
            simple_name=TABLE,
            data=data,
            overwrite_columns=["id"],
            delete_only=delete_only,
        )
        return (time.perf_counter() - started) * 1000, int(inserted), int(deleted)

    def append(self, data: pa.Table) -> None:
        self.writer.write(role_name=ROLE, simple_name=TABLE, data=data, overwrite_columns=[])

    def query(self, sql: str) -> list[dict[str, Any]]:
        reader = self._reader_cls(super_name=SUPER_NAME, organization=ORGANIZATION, query=sql)
        frame, status, message = reader.execute(role_name=ROLE, engine=self._engine)
        if "OK" not in str(status).upper():
            raise RuntimeError(f"query failed ({status}): {message}: {sql}")
        rows: list[dict[str, Any]] = (
            frame.to_dicts() if hasattr(frame, "to_dicts") else (frame.to_dict(orient="records"))
        )
        return rows

    def layout(self) -> Layout:
        table = self._simple_table_cls(self.super_table, TABLE, create_if_missing=False)
        snapshot, _ = table.get_simple_table_snapshot()
        resources = [r for r in snapshot.get("resources") or [] if isinstance(r, dict)]
        return Layout(
            files=[str(r.get("file")) for r in resources],
            rows_per_file=[int(r.get("rows") or 0) for r in resources],
            tombstone_rows=int(snapshot.get("tombstone_rows") or 0),
        )


def ids_sql(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def verify_upserts(
    bench: SuperTableBench, rows: int, latest: dict[int, Any], rnd: random.Random
) -> dict[str, bool]:
    counts = bench.query(f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM {TABLE}")[0]
    sample = sorted(rnd.sample(sorted(latest), min(VERIFY_SAMPLE, len(latest))))
    got = bench.query(f"SELECT id, name, amount FROM {TABLE} WHERE id IN ({ids_sql(sample)})")
    seen = {int(r["id"]): (r["name"], float(r["amount"])) for r in got}
    untouched = [i for i in range(min(rows, len(latest) + VERIFY_SAMPLE)) if i not in latest]
    untouched = untouched[:VERIFY_SAMPLE]
    got_old = bench.query(f"SELECT id, name FROM {TABLE} WHERE id IN ({ids_sql(untouched)})")
    old_ok = len(got_old) == len(untouched) and all(
        r["name"] == f"name-{int(r['id']) % 50_000}" for r in got_old
    )
    return {
        "row_count_after_upserts": int(counts["n"]) == rows,
        "ids_unique_after_upserts": int(counts["d"]) == rows,
        "upserted_values_read_back": len(got) == len(sample)
        and all(seen.get(k) == latest[k] for k in sample),
        "untouched_rows_unchanged": old_ok,
    }


def verify_deletes(
    bench: SuperTableBench, rows: int, deleted: list[int], rnd: random.Random
) -> dict[str, bool]:
    counts = bench.query(f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM {TABLE}")[0]
    sample = rnd.sample(deleted, min(VERIFY_SAMPLE, len(deleted)))
    found = bench.query(f"SELECT count(*) AS n FROM {TABLE} WHERE id IN ({ids_sql(sample)})")[0]
    expected = rows - len(deleted)
    return {
        "row_count_after_deletes": int(counts["n"]) == expected,
        "ids_unique_after_deletes": int(counts["d"]) == expected,
        "deleted_ids_gone": int(found["n"]) == 0,
    }


def timed_changes(
    bench: SuperTableBench,
    runs: int,
    make: Callable[[int], pa.Table],
    delete_only: bool,
    out_ms: list[float],
    out_counts: list[tuple[int, int]],
    out_fsyncs: list[int],
    out_fsync_ms: list[float],
) -> None:
    for run in range(runs):
        data = make(run)
        calls0, secs0 = bench.fsync.snapshot()
        ms, inserted, deleted = bench.write(data, delete_only=delete_only)
        calls1, secs1 = bench.fsync.snapshot()
        out_ms.append(round(ms, 3))
        out_counts.append((inserted, deleted))
        out_fsyncs.append(calls1 - calls0)
        out_fsync_ms.append(round((secs1 - secs0) * 1000, 3))


def run_benchmark(args: argparse.Namespace, fsync: FsyncCounter) -> dict[str, Any]:
    bench = SuperTableBench(fsync)
    per_file = args.rows // args.files
    rows = per_file * args.files
    for i in range(args.files):
        bench.append(base_rows(i * per_file, per_file))
    loaded = bench.layout()

    rnd = random.Random(args.seed)
    latest: dict[int, Any] = {}
    result = Results()

    def next_upsert(run: int) -> pa.Table:
        keys = rnd.sample(range(rows), args.keys)
        table, expected = upsert_rows(keys, run, rnd)
        latest.update(expected)
        return table

    timed_changes(
        bench, args.runs, next_upsert, False, result.upsert_ms, result.upsert_counts,
        result.fsyncs_per_upsert, result.fsync_ms_per_upsert,
    )  # fmt: skip
    after_upserts = bench.layout()
    result.checks.update(verify_upserts(bench, rows, latest, rnd))

    # Distinct ids drawn once and dealt out in turn: each delete takes still-present keys.
    deleted = rnd.sample(range(rows), args.runs * args.keys)

    def next_delete(run: int) -> pa.Table:
        return key_rows(deleted[run * args.keys : (run + 1) * args.keys])

    timed_changes(
        bench, args.runs, next_delete, True, result.delete_ms, result.delete_counts,
        result.fsyncs_per_delete, result.fsync_ms_per_delete,
    )  # fmt: skip
    after_deletes = bench.layout()
    result.checks.update(verify_deletes(bench, rows, deleted, rnd))
    result.checks["each_upsert_replaced_keys"] = all(
        c == (args.keys, args.keys) for c in result.upsert_counts
    )
    result.checks["each_delete_removed_keys"] = all(
        c == (0, args.keys) for c in result.delete_counts
    )

    original = set(loaded.files)
    kept_after_upserts = original & set(after_upserts.files)
    kept_after_deletes = original & set(after_deletes.files)
    rewrote = kept_after_deletes != original
    return {
        "supertable_version": bench.version,
        "rows": rows,
        "files": len(loaded.files),
        "keys_per_change": args.keys,
        "upsert_ms": result.upsert_ms,
        "upsert_p50_ms": round(statistics.median(result.upsert_ms), 3),
        "delete_ms": result.delete_ms,
        "delete_p50_ms": round(statistics.median(result.delete_ms), 3),
        "verified": all(result.checks.values()),
        "checks": result.checks,
        "layout": {
            "rows_per_file_loaded": loaded.rows_per_file,
            "files_after_upserts": len(after_upserts.files),
            "files_after_deletes": len(after_deletes.files),
            "original_files_kept_after_upserts": len(kept_after_upserts),
            "original_files_kept_after_deletes": len(kept_after_deletes),
            "tombstone_rows_after_upserts": after_upserts.tombstone_rows,
            "tombstone_rows_after_deletes": after_deletes.tombstone_rows,
        },
        "fsync": {
            "per_upsert_calls": result.fsyncs_per_upsert,
            "per_upsert_ms": result.fsync_ms_per_upsert,
            "per_delete_calls": result.fsyncs_per_delete,
            "per_delete_ms": result.fsync_ms_per_delete,
        },
        "seed": args.seed,
        "note": note(rewrote, args.files, len(loaded.files)),
    }


def note(rewrote_files: bool, batches: int, files: int) -> str:
    load = (
        f"The {batches} load batches left {files} data files: SuperTable's automatic "
        "small-file compaction (default MAX_MEMORY_CHUNK_SIZE 16 MiB) merged some during "
        "the load. "
        if files != batches
        else ""
    )
    rewrite = (
        "some original data files were rewritten (compaction ran during the changes)"
        if rewrote_files
        else "no original data file was rewritten"
    )
    return load + (
        "SuperTable SDK in process (no HTTP), LOCAL storage in a temp dir, catalog in a "
        "private redis-server (no persistence). Upsert = DataWriter.write(overwrite_columns="
        "['id']) with full rows; delete = DataWriter.write(overwrite_columns=['id'], "
        "delete_only=True) with an id-only table (SuperTable's own delete-by-key). Both are "
        "merge-on-read: an upsert appends the 1,000 new rows as one new Parquet file and "
        "adds the old rows' __rowid__s to a deletion-vector (tombstone) file; a delete only "
        f"adds to the deletion vector; {rewrite}. Data and tombstone files are not fsynced; "
        "SuperTable's LocalStorage fsyncs the snapshot JSON once per commit (see 'fsync'). "
        "Timings are the write() call only; monitoring enqueue to Redis is on (default)."
    )


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="upserts and deletes (each)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the table")
    parser.add_argument("--files", type=int, default=10, help="batches (files) to load")
    parser.add_argument("--keys", type=int, default=1_000, help="keys per upsert/delete")
    parser.add_argument("--seed", type=int, default=0, help="random.Random seed for keys")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.files < 1 or args.rows < args.files:
        parser.error("need --runs >= 1 and --rows >= --files >= 1")
    if 2 * args.runs * args.keys > args.rows:
        parser.error("--rows too small for --runs x --keys deletes")
    return args


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Send everything written to fd 1 (SuperTable logs INFO to stdout) to stderr; yield a
    duplicate of the real stdout for the result."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="supertable-bench-"))
    fsync = FsyncCounter()
    try:
        with stdout_to_stderr() as real_stdout, redis_server(workdir) as port:
            home = workdir / "home"
            home.mkdir()
            configure_supertable_env(home, port)
            os.chdir(home)  # SuperTable resolves LOCAL paths relative to its home
            fsync.install()
            output = run_benchmark(args, fsync)
            os.write(real_stdout, (json.dumps(output) + "\n").encode())
    finally:
        os.chdir(tempfile.gettempdir())
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
