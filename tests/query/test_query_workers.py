"""Queries in worker processes: a query that ignores its interrupt or its memory limit is
stopped by its worker's death (killed by the service, or by the kernel's limits), the
worker is replaced, and every other query and request goes on."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import projections.query.worker as worker_module
from app.settings import Settings
from events.errors import QueryTimeout, QueryTooLarge, Unavailable
from projections.catalog import SuperState
from projections.query.engine import QueryEngine
from projections.query.types import QueryLimits
from projections.query.wire import END, End, EngineConfig, Job
from projections.query.workers import Worker, WorkerDied, lost_error
from tests.support.processes import cli_env
from tests.support.workers import Starts

EMPTY = SuperState(org="o", name="s")
# list_sort checks neither DuckDB's interrupt nor its memory limit: 1e8 elements sort for
# tens of seconds and take gigabytes; 4e6 take a second or two of CPU.
HOSTILE = "select len(list_sort(range(100000000)))"
STUBBORN = "select len(list_sort(range(6000000)))"


def engine(tmp_path: Path, **limits: Any) -> QueryEngine:
    return QueryEngine(lambda key: key, QueryLimits(**limits), tmp_path / "q")


def run(eng: QueryEngine, sql: str, **kwargs: Any) -> Any:
    return anyio.run(lambda: eng.run(EMPTY, sql, **kwargs))


@pytest.mark.slow
def test_a_hostile_query_is_killed_in_time_while_others_go_on(tmp_path: Path) -> None:
    eng = engine(tmp_path, concurrency=2, threads=1)
    started = Starts(eng).workers
    assert run(eng, "select 1 as x").table.to_pylist() == [{"x": 1}]
    answered: list[float] = []
    stop = threading.Event()

    def others() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            assert run(eng, "select 41 + 1 as x").table.to_pylist() == [{"x": 42}]
            answered.append(time.perf_counter() - t)

    side = threading.Thread(target=others)
    side.start()
    began = time.monotonic()
    try:
        with pytest.raises(QueryTimeout, match="killed"):
            run(eng, HOSTILE, timeout_s=2)
        took = time.monotonic() - began
    finally:
        stop.set()
        side.join()
    assert took < 2 + 1, took  # the bound: its timeout plus one second
    assert len(answered) > 10  # the other queries kept being answered meanwhile
    hostile = [w for w in started if w.conn.closed]
    assert len(hostile) == 1 and hostile[0].proc.wait(10) == -signal.SIGKILL
    # Its place is free at once, and a new worker serves the next queries.
    assert run(eng, "select 7 as x").table.to_pylist() == [{"x": 7}]
    eng.close()
    assert all(w.proc.poll() is not None for w in started)


@pytest.mark.slow
def test_a_query_past_its_workers_address_space_is_413_and_the_worker_survives(
    tmp_path: Path,
) -> None:
    # DuckDB's own limit far above the process's: only the kernel's limit stops it.
    eng = engine(tmp_path, concurrency=1, threads=1, memory_limit="64GB",
                 worker_address_space=1 * 2**30)  # fmt: skip
    started = Starts(eng).workers
    with pytest.raises(QueryTooLarge) as too_large:
        run(eng, HOSTILE, timeout_s=60)
    assert too_large.value.code == "query_out_of_memory"
    assert run(eng, "select 3 as x").table.to_pylist() == [{"x": 3}]
    assert len(started) == 1  # the allocation failed cleanly: the same worker goes on
    eng.close()


def test_a_worker_killed_under_a_query_is_replaced(tmp_path: Path) -> None:
    """What the OOM killer (or an operator) does: the query gets a clear 413, the next
    query a new worker."""
    eng = engine(tmp_path, concurrency=1, threads=1)
    starts = Starts(eng)
    started = starts.workers
    result: list[BaseException] = []

    def slow() -> None:
        try:
            run(eng, "select count(*) from range(10000000000)", timeout_s=60)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    assert starts.first.wait(30)
    os.kill(started[0].pid, signal.SIGKILL)
    thread.join(60)
    assert len(result) == 1 and isinstance(result[0], QueryTooLarge), result
    assert "SIGKILL" in str(result[0])
    assert run(eng, "select 5 as x").table.to_pylist() == [{"x": 5}]
    assert len(started) == 2
    eng.close()


def test_a_busy_slot_is_refused_and_freed_by_the_kill(tmp_path: Path) -> None:
    eng = engine(tmp_path, concurrency=1, threads=1, grace_s=0.2)
    taken = threading.Event()
    eng.workers.on_start = lambda worker: taken.set()
    errors: list[BaseException] = []

    def hostile() -> None:
        try:
            run(eng, HOSTILE, timeout_s=1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=hostile)
    thread.start()
    assert taken.wait(30)  # the hostile query has the only worker
    with pytest.raises(Unavailable) as busy:
        run(eng, "select 1", timeout_s=0.3)
    assert busy.value.code == "query_busy"
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], QueryTimeout)
    # Before workers, an abandoned engine thread kept its slot until it ended by itself.
    assert run(eng, "select 9 as x", timeout_s=5).table.to_pylist() == [{"x": 9}]
    eng.close()


def test_warm_starts_workers_before_any_query(tmp_path: Path) -> None:
    eng = engine(tmp_path, concurrency=3)
    ready = threading.Semaphore(0)
    eng.workers.on_start = lambda worker: ready.release()
    eng.warm(2)
    assert ready.acquire(timeout=30) and ready.acquire(timeout=30)
    with eng.workers.cond:
        assert eng.workers.total == 2
    assert run(eng, "select 1 as x").table.to_pylist() == [{"x": 1}]
    with eng.workers.cond:
        assert eng.workers.total == 2  # an idle warm worker served it
    eng.close()


def test_the_cpu_limit_ends_a_worker_that_outruns_its_budget(tmp_path: Path) -> None:
    """The kernel's CPU limit, without the service's kill: a job allowed 0.05 s on one
    thread (the budget is that plus a second) is ended by SIGXCPU."""
    config = EngineConfig(threads=1, memory_limit="2GB", max_temp_bytes="1GB",
                          temp_root=str(tmp_path))  # fmt: skip
    worker = Worker(config)
    job = Job(key="", views={}, paths={}, sql=STUBBORN.replace("6000000", "40000000"),
              limit=10, offset=0, timeout=0.05, run_for=60, plan_only=False)  # fmt: skip
    job = msgspec.structs.replace(job, run_for=0.05)  # the worker's interrupt fires...
    with pytest.raises(WorkerDied) as died:  # ...unheeded, and the CPU time runs out
        worker.run(msgspec.msgpack.encode(job), time.monotonic() + 60)
    assert died.value.returncode == -signal.SIGXCPU
    assert isinstance(lost_error(died.value, 0), QueryTimeout)


def test_a_fired_alarm_keeps_the_connection_out_of_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupt may fire just as the query ends: that connection was interrupted
    (or is about to be) and must not serve the next query. (The worker's loop, run in
    this process on a socket pair.)"""
    ours, theirs = socket.socketpair()
    config = EngineConfig(threads=1, memory_limit="1GB", max_temp_bytes="1GB",
                          temp_root=str(tmp_path))  # fmt: skip
    served = worker_module._Worker(config, Connection(theirs.detach()))
    # In this process, the worker's CPU limit would be the test runner's.
    monkeypatch.setattr(served, "_limit_cpu", lambda job: None)
    thread = threading.Thread(target=served.serve, daemon=True)
    thread.start()
    conn = Connection(ours.detach())

    def ask(sql: str) -> End:
        job = Job(key="k", views={}, paths={}, sql=sql, limit=10, offset=0, timeout=5,
                  run_for=5, plan_only=False)  # fmt: skip
        conn.send_bytes(msgspec.msgpack.encode(job))
        while True:
            frame = conn.recv_bytes()
            if frame[:1] == END:
                return msgspec.msgpack.decode(frame[1:], type=End)

    assert ask("select 1").kept == ("k",)  # a query that ended well leaves its connection
    second = ask("select 2")
    assert second.reused and second.kept == ("k",)
    disarm = served.alarm.disarm

    def fired_at_the_end() -> bool:
        disarm()
        return True

    monkeypatch.setattr(served.alarm, "disarm", fired_at_the_end)
    third = ask("select 3")
    assert third.reused and third.kept == ()
    assert not ask("select 4").reused
    conn.close()
    thread.join(10)


def test_workers_end_with_the_service(tmp_path: Path) -> None:
    """A service killed with SIGKILL leaves no query worker behind."""
    script = (
        "import anyio, sys\n"
        "from pathlib import Path\n"
        "from projections.catalog import SuperState\n"
        "from projections.query.engine import QueryEngine\n"
        "from projections.query.types import QueryLimits\n"
        "eng = QueryEngine(lambda k: k, QueryLimits(), Path(sys.argv[1]))\n"
        "pids = []\n"
        "eng.workers.on_start = lambda w: pids.append(w.pid)\n"
        "anyio.run(lambda: eng.run(SuperState(org='o', name='s'), 'select 1'))\n"
        "print(pids[0], flush=True)\n"
        "sys.stdin.read()\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "q")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    try:
        assert service.stdout is not None
        pid = int(service.stdout.readline())
        ended = os.pidfd_open(pid)  # readable once the worker has ended
        try:
            os.kill(service.pid, signal.SIGKILL)
            service.wait(30)
            assert select.select([ended], [], [], 30)[0] == [ended]
        finally:
            os.close(ended)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


@pytest.mark.parametrize(
    ("setting", "value"),
    [("query_workers_warm", 5), ("query_workers_warm", -1), ("query_kill_after_s", 0.0),
     ("query_kill_after_s", 1.5), ("query_worker_memory_bytes", 2**20),
     ("query_concurrency", 0)],
)  # fmt: skip
def test_bad_worker_settings_are_refused(settings: Settings, setting: str, value: Any) -> None:
    with pytest.raises(SystemExit):
        msgspec.structs.replace(settings, **{setting: value}).validate()


def test_a_worker_that_died_idle_is_replaced_without_failing_the_query(tmp_path: Path) -> None:
    eng = engine(tmp_path, concurrency=1)
    starts = Starts(eng)
    assert run(eng, "select 1 as x").table.to_pylist() == [{"x": 1}]
    idle = starts.workers[0]
    os.kill(idle.pid, signal.SIGKILL)
    assert idle.proc.wait(10) == -signal.SIGKILL
    # Nothing of the next query ran on it: it runs on a new worker, and succeeds.
    assert run(eng, "select 2 as x").table.to_pylist() == [{"x": 2}]
    assert len(starts.workers) == 2
    eng.close()


def test_a_worker_holds_none_of_the_services_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile SQL runs in the worker: the service's secrets are not in its environment."""
    monkeypatch.setenv("LEDGERLAKE_API_TOKEN", "the-service-token")
    monkeypatch.setenv("_LEDGERLAKE_SERVE_PEER", '{"settings": {"api_token": "x"}}')
    monkeypatch.setenv("UNRELATED_VARIABLE", "kept")
    eng = engine(tmp_path, concurrency=1)
    assert run(eng, "select 1 as x").table.to_pylist() == [{"x": 1}]
    with eng.workers.cond:
        (worker,) = eng.workers.idle
    environ = Path(f"/proc/{worker.proc.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0] for entry in environ if entry}
    assert b"UNRELATED_VARIABLE" in names
    assert not any(b"LEDGERLAKE_" in name for name in names), names
    eng.close()


def test_connections_trust_the_cached_files(tmp_path: Path) -> None:
    """Data files never change once published, so a connection does not re-validate a
    cached file before each use (with external access off, that check dominated a
    100-file query)."""
    from projections.query.sandbox import base_connection

    eng = engine(tmp_path)
    con = base_connection(eng.config, tmp_path / "t", None)
    try:
        setting = "select current_setting('validate_external_file_cache')"
        assert con.execute(setting).fetchone() == ("NO_VALIDATION",)
    finally:
        con.close()
        eng.close()
