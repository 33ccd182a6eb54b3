"""Real ``ledgerlake`` processes, started and stopped by pid: helpers and the ``procs`` and
``start_server`` fixtures (a plugin of tests/conftest.py, so they reach every package that
runs processes: tests/cli, tests/ops, tests/e2e).

Every process a test starts goes through the ``procs`` fixture, which kills whatever is
still running at teardown (by pid, never by name). Embedded redis-servers are spawned by
``serve``/CLI processes we started; the fixture also stops those, after checking that the
pid still belongs to a redis-server of one of this test's data dirs.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from app.ops.embedded_redis import EmbeddedRedis
from tests.conftest import free_port

LEDGERLAKE = str(Path(sys.executable).with_name("ledgerlake"))
if not os.access(LEDGERLAKE, os.X_OK):  # pragma: no cover - unusual layouts
    LEDGERLAKE = shutil.which("ledgerlake") or LEDGERLAKE

CLI_TIMEOUT_S = 90.0
START_TIMEOUT_S = 60.0


def cli_env(**settings: str | Path | None) -> dict[str, str]:
    """The environment for a child: ours minus any LEDGERLAKE_* setting, plus these
    (keys are setting names, e.g. ``redis_url``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERLAKE_")}
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in settings.items():
        if value is not None:
            env[f"LEDGERLAKE_{name.upper()}"] = str(value)
    return env


# -- processes ------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` from /proc (None if there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running process (a zombie has exited: not alive)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_dead(pid: int, timeout: float = 30.0) -> None:
    """Block until ``pid`` has exited (event-driven through a pidfd where possible)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(timeout * 1000)
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):  # no pidfd support: poll the process table
        assert time.monotonic() < deadline, f"pid {pid} did not exit within {timeout}s"
        time.sleep(0.01)
    assert not pid_alive(pid), f"pid {pid} did not exit within {timeout}s"


class Procs:
    """Every process a test starts; teardown kills what is left."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.redis_dirs: list[Path] = []

    def spawn(self, args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(args, env=env, **kwargs)
        self.children.append(proc)
        return proc

    def cli(
        self, *args: str | Path, env: dict[str, str], timeout: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ledgerlake ARGS`` to completion; text stdout/stderr."""
        argv = [LEDGERLAKE, *map(str, args)]
        proc = self.spawn(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"`ledgerlake {' '.join(map(str, args))}` did not finish in {timeout}s; "
                f"stderr: {err.decode(errors='replace')}"
            ) from None
        return subprocess.CompletedProcess(
            argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def track_embedded(self, data_dir: Path) -> None:
        if data_dir not in self.redis_dirs:
            self.redis_dirs.append(data_dir)

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for data_dir in self.redis_dirs:
            pid = embedded_redis_pid(data_dir)
            if pid is not None and is_embedded_redis_of(pid, data_dir):
                os.kill(pid, signal.SIGKILL)
                wait_dead(pid)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


# -- the embedded redis of a data dir -------------------------------------------------


def redis_dir(data_dir: Path) -> Path:
    return (data_dir / "redis").resolve()


def embedded_socket(data_dir: Path) -> Path:
    return EmbeddedRedis(data_dir).socket


def embedded_redis_pid(data_dir: Path) -> int | None:
    """The pid recorded in ``<data-dir>/redis/redis.pid`` (None if there is none)."""
    try:
        return int((redis_dir(data_dir) / "redis.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_embedded_redis_of(pid: int, data_dir: Path) -> bool:
    """``pid`` is a live redis-server serving this data dir's socket (guards pid reuse)."""
    line = cmdline(pid)
    return pid_alive(pid) and "redis-server" in line and str(embedded_socket(data_dir)) in line


def redis_pids_in_log(data_dir: Path) -> set[int]:
    """Pids of every redis-server that ever logged to ``<data-dir>/redis/redis.log``."""
    try:
        text = (redis_dir(data_dir) / "redis.log").read_text(errors="replace")
    except FileNotFoundError:
        return set()
    return {int(m) for m in re.findall(r"^(\d+):[MCXS] ", text, re.MULTILINE)}


def live_embedded_redis(data_dir: Path) -> list[int]:
    """Every running redis-server for this data dir: the logged pids, the pid file, and
    any process whose command line names the data dir's socket."""
    candidates = redis_pids_in_log(data_dir)
    if (pid := embedded_redis_pid(data_dir)) is not None:
        candidates.add(pid)
    sock = str(embedded_socket(data_dir))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and sock in cmdline(int(entry.name)):
            candidates.add(int(entry.name))
    return sorted(p for p in candidates if is_embedded_redis_of(p, data_dir))


# -- a `ledgerlake serve` process -----------------------------------------------------


class Server:
    """``ledgerlake serve`` on 127.0.0.1 and a free port, stderr captured to a file."""

    def __init__(self, procs: Procs, data_dir: Path, env: dict[str, str], log_dir: Path) -> None:
        self.procs = procs
        self.data_dir = data_dir
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stderr_path = log_dir / "none.log"
        self._runs = 0
        if "LEDGERLAKE_REDIS_URL" not in env:
            procs.track_embedded(data_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> Server:
        for _ in range(3):
            self._runs += 1
            self.port = free_port()
            self.stderr_path = self.log_dir / f"serve-{self.port}-{self._runs}.log"
            with open(self.stderr_path, "wb") as err:
                self.proc = self._spawn(err)
            if self._wait_healthy(timeout):
                return self
            if "address already in use" not in self.stderr().lower():
                break  # a real failure, not a lost race for the port
        raise AssertionError(f"serve did not come up; stderr:\n{self.stderr()}")

    def _spawn(self, err: IO[bytes]) -> subprocess.Popen[bytes]:
        args = [LEDGERLAKE, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--data-dir", str(self.data_dir)]
        # One server process unless the test asks for more (the default is one per core).
        env = {"LEDGERLAKE_SERVE_WORKERS": "1", **self.env}
        return self.procs.spawn(args, env, stdout=err, stderr=err)

    def _wait_healthy(self, timeout: float) -> bool:
        """Poll /health until it answers 200, the process dies, or the deadline passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.05)  # poll without a bare sleep
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"serve not healthy within {timeout}s; stderr:\n{self.stderr()}")

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client of the server, with its admin token: LEDGERLAKE_API_TOKEN if the
        environment sets one, else the one ``serve`` bootstrapped into the data dir."""
        kwargs.setdefault("headers", self.auth_headers())
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)

    def auth_headers(self) -> dict[str, str]:
        token = self.env.get("LEDGERLAKE_API_TOKEN")
        path = self.data_dir / "admin-token"
        if not token and path.exists():
            token = path.read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        """Send ``sig`` (Ctrl-C by default), then wait for the exit. Returns the code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve ignored signal {sig} for {timeout}s") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def start_server(procs: Procs, tmp_path: Path) -> Any:
    """``start_server(data_dir, env)`` -> a running, healthy ``Server``."""

    def start(data_dir: Path, env: dict[str, str]) -> Server:
        return Server(procs, data_dir, env, tmp_path).start()

    return start
