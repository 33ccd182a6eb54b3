"""A query worker process (``python -m projections.query.worker FD LIFE_FD``): runs one
query at a time, in the sandbox, on connections it keeps for reuse; the service kills it
when a query outlives its timeout (see ``workers``).

Its limits are the operating system's: the address space (``RLIMIT_AS``) for the life of
the process, and the CPU time (``RLIMIT_CPU``) each query may add, so a function that
ignores DuckDB's interrupt and memory limit is stopped by the kernel or the service, not
by its own good will. It exits when the service does (``LIFE_FD`` reaches end of file).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa

from events.errors import LedgerError, QueryTooLarge
from projections.query.pool import ConnectionPool, Pooled
from projections.query.sandbox import engine_error, sandboxed_connection
from projections.query.wire import (
    BATCH,
    END,
    FAILURE,
    READY,
    SCHEMA,
    End,
    EngineConfig,
    Failure,
    Job,
)


class _Alarm:
    """One thread that interrupts the running query's connection at its deadline."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.at = 0.0
        self.fired = False
        threading.Thread(target=self._loop, daemon=True, name="query-alarm").start()

    def arm(self, con: duckdb.DuckDBPyConnection, seconds: float) -> None:
        with self.cond:
            self.con, self.at, self.fired = con, time.monotonic() + seconds, False
            self.cond.notify()

    def disarm(self) -> bool:
        """Whether the alarm fired (decided under the lock: a connection it may still
        reach must not serve another query)."""
        with self.cond:
            self.con = None
            return self.fired

    def _loop(self) -> None:
        with self.cond:
            while True:
                if self.con is None:
                    self.cond.wait()
                    continue
                left = self.at - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                with contextlib.suppress(duckdb.Error):  # closed: nothing to stop
                    self.con.interrupt()
                self.fired, self.con = True, None


class _Worker:
    def __init__(self, config: EngineConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self.pool = ConnectionPool(config.pooled)
        self.alarm = _Alarm()
        self.encode = msgspec.msgpack.Encoder().encode
        self.opened = 0
        self.current: tuple[int, bool] = (0, False)  # the job's connection, reused
        self.decode_job = msgspec.msgpack.Decoder(Job).decode

    def serve(self) -> None:
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                return
            job = self.decode_job(data)
            self._limit_cpu(job)
            self.current = (0, False)
            try:
                end = self._run(job)
            except LedgerError as exc:
                self.conn.send_bytes(FAILURE + self.encode(self._failure(exc)))
            except MemoryError:
                error = QueryTooLarge("the query needs more memory than its worker may use")
                self.conn.send_bytes(FAILURE + self.encode(self._failure(error)))
            else:
                self.conn.send_bytes(END + self.encode(end))

    def _failure(self, exc: LedgerError) -> Failure:
        connection, reused = self.current
        kept = tuple(str(k) for k in self.pool.held())
        return Failure(type(exc).__name__, exc.message, exc.code, connection, reused, kept)

    def _limit_cpu(self, job: Job) -> None:
        """Past what it used so far, the process may use the job's timeout on each of
        its threads, and a second more: then the kernel ends it (SIGXCPU)."""
        user, system = os.times()[:2]
        budget = job.run_for * max(self.config.threads, 1) + 1.0
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(user + system + budget)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))

    def _run(self, job: Job) -> End:
        started = time.perf_counter()
        pooled = self.pool.take(job.key) if job.key else None
        reused = pooled is not None
        if pooled is None:
            temp_dir = Path(self.config.temp_root) / uuid.uuid4().hex
            con = sandboxed_connection(
                self.config, job.views, job.paths.__getitem__, temp_dir, job.secret
            )
            self.opened += 1
            pooled = Pooled(con, temp_dir, serial=self.opened)
        self.current = (pooled.serial, reused)
        self.alarm.arm(pooled.con, job.run_for)
        reusable, truncated, plan = False, False, None
        try:
            if job.plan_only:
                # A relation is bound (names, types, functions checked) but not run.
                relation = pooled.con.sql(job.sql)
                self._send_schema(relation.limit(0).to_arrow_table().schema)
                plan = relation.explain()
                reusable = True
            else:
                truncated = self._stream(pooled.con, job)
                # A truncated result leaves the query unfinished on the connection (its
                # state, maybe spill files): such a connection is not kept.
                reusable = not truncated
        except duckdb.Error as exc:
            raise engine_error(exc, job.timeout) from exc
        finally:
            fired = self.alarm.disarm()
            # A connection is kept only after a query that ended well and was never
            # interrupted (an interrupt could reach its next query).
            keep = reusable and not fired and bool(job.key)
            if not (keep and self.pool.give(job.key, pooled)):
                pooled.close()
        return End(
            truncated=truncated,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            plan=plan,
            connection=pooled.serial,
            reused=reused,
            kept=tuple(str(k) for k in self.pool.held()),
        )

    def _send_schema(self, schema: pa.Schema) -> None:
        self.conn.send_bytes(SCHEMA + schema.serialize().to_pybytes())

    def _stream(self, con: duckdb.DuckDBPyConnection, job: Job) -> bool:
        """Sends the rows of the job's SQL past its offset, up to its row limit and the
        byte limit; whether the result was cut there."""
        limit, offset = job.limit, job.offset
        reader = con.execute(job.sql).to_arrow_reader(min(limit + 1, 65536))
        self._send_schema(reader.schema)
        count, size = 0, 0
        for batch in reader:
            if offset:  # skipped rows of the same plan: pages keep the engine's order
                skip = min(offset, batch.num_rows)
                offset -= skip
                batch = batch.slice(skip)
                if not batch.num_rows:
                    continue
            truncated = count + batch.num_rows > limit
            if truncated:
                batch = batch.slice(0, limit - count)
            self.conn.send_bytes(BATCH + batch.serialize().to_pybytes())
            count += batch.num_rows
            size += batch.nbytes
            if truncated or size > self.config.max_result_bytes:
                return True
        return False


def _exit_with_parent(fd: int) -> None:
    """Ends the process once the service has gone (its end of the pipe closed)."""
    while os.read(fd, 1):
        pass
    os._exit(0)


def main(argv: list[str]) -> None:
    fd, life = int(argv[1]), int(argv[2])
    threading.Thread(target=_exit_with_parent, args=(life,), daemon=True).start()
    conn = Connection(fd)
    config = msgspec.msgpack.decode(conn.recv_bytes(), type=EngineConfig)
    if config.address_space:
        resource.setrlimit(resource.RLIMIT_AS, (config.address_space, config.address_space))
    conn.send_bytes(READY)
    _Worker(config, conn).serve()


if __name__ == "__main__":
    main(sys.argv)
