"""Query worker processes as the service sees them: a pool of them, each running one
query at a time, killed and replaced when a query outlives its timeout.

A query runs in a worker process (``worker``), never in the service: a DuckDB function
that ignores its interrupt and memory limit holds a worker's CPU and memory, under the
worker's operating-system limits, until the service kills it a moment after the
query's timeout. Other queries and requests are untouched. Each worker keeps the
connections of the queries it ran (``pool``); a query goes to an idle worker that kept
its key when there is one, so connection reuse works as it did in process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import pyarrow as pa

import events.errors as errors
from events.errors import LedgerError, QueryTimeout, QueryTooLarge, Unavailable
from projections.query.wire import (
    BATCH,
    END,
    FAILURE,
    READY,
    SCHEMA,
    End,
    EngineConfig,
    Failure,
)

START_TIMEOUT_S = 30.0
_ROOT = str(Path(__file__).resolve().parents[2])
_decode_end = msgspec.msgpack.Decoder(End).decode
_decode_failure = msgspec.msgpack.Decoder(Failure).decode


class Overtime(Exception):
    """The worker did not answer by its deadline (it has been killed)."""


class WorkerDied(Exception):
    """The worker process ended in the middle of a query."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"query worker ended ({returncode})")
        self.returncode = returncode


class WorkerGone(WorkerDied):
    """The worker had ended before it got the job: the job can run on another."""


class Worker:
    """One worker process and its end of the socket pair."""

    def __init__(self, config: EngineConfig) -> None:
        self.temp_root = Path(config.temp_root) / f"worker-{uuid.uuid4().hex}"
        self.temp_root.mkdir(parents=True)
        config = msgspec.structs.replace(config, temp_root=str(self.temp_root))
        ours, theirs = socket.socketpair()
        life_r, self.life = os.pipe()
        # Hostile SQL runs here: none of the service's own settings (its API token, JWT
        # secret, Redis password, serve's peer settings) are in this process's memory.
        env = {k: v for k, v in os.environ.items() if not k.lstrip("_").startswith("LEDGERLAKE_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "projections.query.worker", str(theirs.fileno()),
                 str(life_r)],
                pass_fds=(theirs.fileno(), life_r),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            os.close(self.life)
            shutil.rmtree(self.temp_root, ignore_errors=True)
            raise Unavailable(
                f"a query worker could not be started: {exc}", code="query_unavailable"
            ) from exc
        finally:
            theirs.close()
            os.close(life_r)
        self.conn = Connection(ours.detach())
        self.kept: tuple[str, ...] = ()
        self.killed = False
        self.lock = threading.Lock()
        self.last: End | Failure | None = None  # the answer to the last job
        self.conn.send_bytes(msgspec.msgpack.encode(config))
        try:
            ready = self.conn.poll(START_TIMEOUT_S) and self.conn.recv_bytes() == READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise Unavailable("a query worker did not start", code="query_unavailable")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, job: bytes, kill_at: float) -> tuple[pa.Schema | None, list[pa.RecordBatch], End]:
        """Sends ``job`` and reads its answer: the result's schema and batches and its
        end. Raises the query's domain error, ``Overtime`` (the worker has then been
        killed) or ``WorkerDied``."""
        self.last = None
        try:
            self.conn.send_bytes(job)
        except OSError:
            # It died while idle (the OOM killer, an operator): nothing of the job ran.
            self.kill()
            raise WorkerGone(self.proc.poll()) from None
        schema: pa.Schema | None = None
        batches: list[pa.RecordBatch] = []
        while True:
            frame = self._receive(kill_at)
            tag, body = frame[:1], pa.py_buffer(memoryview(frame)[1:])
            if tag == BATCH:
                batches.append(pa.ipc.read_record_batch(body, schema))
            elif tag == SCHEMA:
                schema = pa.ipc.read_schema(body)
            elif tag == END:
                end = _decode_end(body)
                self.kept, self.last = end.kept, end
                return schema, batches, end
            else:
                assert tag == FAILURE, tag
                failure = _decode_failure(body)
                self.kept, self.last = failure.kept, failure
                raise _error(failure)

    def _receive(self, kill_at: float) -> bytes:
        left = kill_at - time.monotonic()
        try:
            if left <= 0 or not self.conn.poll(left):
                self.kill()
                raise Overtime()
            return self.conn.recv_bytes()
        except (EOFError, OSError):
            # Its socket closed: the process ended (or is ending) by itself.
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.kill()
            raise WorkerDied(code) from None

    def kill(self, *, wait: bool = False) -> None:
        """Ends the process (SIGKILL) and removes what it spilled; with ``wait`` once it
        has ended, else at once (the process is reaped in the background)."""
        with self.lock:
            if self.killed:
                return  # once: a second close of the pipe could close a reused fd
            self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.conn.close()
        os.close(self.life)
        if wait:
            self._reap()
        else:
            threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _error(failure: Failure) -> LedgerError:
    cls = getattr(errors, failure.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, LedgerError)):
        cls = LedgerError
    return cls(failure.message, code=failure.code)


def lost_error(exc: WorkerDied, address_space: int) -> LedgerError:
    """What a worker that died under a query means to the caller."""
    code = exc.returncode
    if code == -signal.SIGXCPU:
        return QueryTimeout(
            "the query used more CPU time than its timeout allows; its worker process "
            "was stopped and replaced"
        )
    if code is not None and code < 0:
        limit = f" of {address_space / 2**30:g} GiB" if address_space else ""
        return QueryTooLarge(
            f"the query's worker process ended ({signal.Signals(-code).name}), most "
            f"likely past its memory limit{limit}; it was replaced"
        )
    return Unavailable(
        f"the query's worker process ended unexpectedly (exit code {code}); it was "
        "replaced, try again",
        code="query_unavailable",
    )


class WorkerPool:
    """At most ``size`` workers; a query takes an idle one (one that kept its key if
    any), or starts one while there are fewer than ``size``."""

    def __init__(self, config: EngineConfig, size: int) -> None:
        self.config = config
        self.size = size
        self.idle: list[Worker] = []
        self.total = 0  # running or starting
        self.warm_size = 0
        self.closed = False
        self.cond = threading.Condition()
        # Called with each worker started, and with each answer (tests watch through them).
        self.on_start: Callable[[Worker], None] | None = None
        self.on_answer: Callable[[Worker, End | Failure], None] | None = None

    def warm(self, count: int) -> None:
        """Starts workers in the background until ``count`` run (and keeps that many
        after a kill)."""
        self.warm_size = min(count, self.size)
        for _ in range(self.warm_size):
            threading.Thread(target=self._start_idle, daemon=True).start()

    def acquire(self, key: str, timeout: float) -> Worker:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.closed:
                    raise Unavailable("the query engine is closed", code="query_unavailable")
                if self.idle:
                    chosen = next((w for w in reversed(self.idle) if key in w.kept), self.idle[-1])
                    self.idle.remove(chosen)
                    return chosen
                if self.total < self.size:
                    self.total += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"all {self.size} query slots stayed busy for {timeout:g}s; "
                        "try again later",
                        code="query_busy",
                    )
                self.cond.wait(left)
        return self._start()

    def release(self, worker: Worker, healthy: bool) -> None:
        """Back to the idle workers, or (not ``healthy``) killed and replaced."""
        if self.on_answer is not None and worker.last is not None:
            self.on_answer(worker, worker.last)
        with self.cond:
            if healthy and not self.closed:
                self.idle.append(worker)
                self.cond.notify()
                return
            self.total -= 1
            self.cond.notify()
            closed = self.closed
            replace = not closed and self.total < self.warm_size
        worker.kill(wait=closed)
        if replace:
            threading.Thread(target=self._start_idle, daemon=True).start()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            idle, self.idle = self.idle, []
            self.total -= len(idle)
            self.cond.notify_all()
        for worker in idle:
            worker.kill(wait=True)

    def _start(self) -> Worker:
        """A new worker, its place already counted in ``total``."""
        try:
            worker = Worker(self.config)
        except BaseException:
            with self.cond:
                self.total -= 1
                self.cond.notify()
            raise
        if self.on_start is not None:
            self.on_start(worker)
        return worker

    def _start_idle(self) -> None:
        with self.cond:
            if self.closed or self.total >= self.warm_size:
                return
            self.total += 1
        try:
            worker = self._start()
        except Unavailable:
            return  # the next query starts one (and says why it cannot)
        self.release(worker, healthy=True)
