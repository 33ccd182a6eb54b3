"""A deployment whose parts fail on demand, for the chaos suite (tests/chaos): a durable
redis-server (AOF, ``appendfsync always``) on a fixed loopback port, a SeaweedFS S3
server (``weed mini``) on fixed loopback ports, and ``ledgerlake serve`` on both.

Each part can be killed (``serve`` and Redis: SIGKILL) or stopped (S3: SIGTERM, as an
object store going away; its own durability is not what is under test) and brought
back with its data: Redis and S3 on the same addresses, ``serve`` on a fresh free port
(``url`` follows it). Several ``serve`` processes are API pods behind a load balancer.
Every process is one this module started, stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from tests.conftest import free_port
from tests.e2e.test_redis_restart import start_durable_redis
from tests.support.processes import Procs, Server, cli_env
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, S3Server, start_s3

TOKEN = "chaos-admin-token"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to a process we started (SIGKILL if it ignores it), then reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ChaosRedis:
    """A redis-server whose acknowledged writes survive SIGKILL (AOF, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc = start_durable_redis(workdir, self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def start(self) -> None:
        """Back on the same port, from its append-only file."""
        self.proc = start_durable_redis(self.workdir, self.port)

    def close(self) -> None:
        _stop(self.proc, signal.SIGKILL)


class ChaosS3:
    """``weed mini`` that can be stopped and started again on the same ports and data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server: S3Server = start_s3(workdir)
        self.proc = self.server.process

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.server.process.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.workdir, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        client: Any = self.server.client()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, "weed mini exited on restart (see weed.log)"
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                assert time.monotonic() < deadline, "weed mini did not come back"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)  # polling the server's readiness

    def close(self) -> None:
        _stop(self.proc, signal.SIGTERM)


class ChaosCluster:
    """Redis, S3 and ``servers`` ``serve`` processes (API pods on the same Redis and
    bucket, each with its own data dir), with a generation that moves on each fault and
    repair so that clients waiting out an outage wake as soon as something changed."""

    def __init__(self, procs: Procs, workdir: Path, servers: int = 1, **settings: str) -> None:
        (workdir / "redis").mkdir(parents=True)
        (workdir / "s3").mkdir()
        self.workdir = workdir
        self.changed = threading.Condition()
        self.generation = 0
        self.redis = ChaosRedis(workdir / "redis")
        try:
            self.s3 = ChaosS3(workdir / "s3")
        except BaseException:
            self.redis.close()
            raise
        self.env = cli_env(
            redis_url=self.redis.url,
            redis_prefix=f"chaos{uuid.uuid4().hex[:6]}",
            storage_url=f"s3://chaos-{uuid.uuid4().hex[:10]}/lake",
            s3_endpoint_url=self.s3.endpoint,
            s3_access_key_id=ACCESS_KEY,
            s3_secret_access_key=SECRET_KEY,
            s3_max_attempts="3",
            api_token=TOKEN,
            **settings,
        )
        # The first pod runs two server processes (``serve --workers 2``), the others one.
        self.servers = [
            Server(procs, workdir / f"data{n}",
                   {**self.env, "LEDGERLAKE_SERVE_WORKERS": "2" if n == 0 else "1"}, workdir)
            for n in range(servers)
        ]  # fmt: skip
        self.down: set[int] = set()  # the servers killed on purpose, not yet restarted
        self.closed = False  # set first by close(): nothing is started any more

    def start(self) -> ChaosCluster:
        for server in self.servers:
            server.start()
        return self

    @property
    def data_dir(self) -> Path:
        return self.servers[0].data_dir

    def kill_server(self, n: int) -> None:
        self.down.add(n)
        self.servers[n].kill9()

    def restart_server(self, n: int) -> None:
        if not self.closed:
            self.servers[n].start()
            self.down.discard(n)

    def crashed(self) -> list[str]:
        """The servers that exited by themselves (not killed by the injector), with the
        end of their stderr."""
        return [
            f"serve{n} exited with {server.proc.returncode}: {server.stderr()[-1500:]}"
            for n, server in enumerate(self.servers)
            if n not in self.down and server.proc is not None and server.proc.poll() is not None
        ]

    def url(self, n: int = 0) -> str:
        """The address of server ``n`` (modulo their number) as it is now."""
        return self.servers[n % len(self.servers)].url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def bump(self) -> None:
        """Something changed (a fault or a repair): wake every waiting client."""
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block until the generation moves past ``seen`` or ``timeout`` passes."""
        with self.changed:
            self.changed.wait_for(lambda: self.generation != seen, timeout=timeout)
            return self.generation

    def wait_healthy(self) -> None:
        """Poll ``/health`` until every running server says ok (they reconnect to Redis
        by themselves)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=5.0) as client:
            for n, server in enumerate(self.servers):
                while n not in self.down:
                    assert not (crashed := self.crashed()), "; ".join(crashed)
                    try:
                        if client.get(f"{server.url}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "serve did not become healthy again"
                    self.wait_change(self.generation, 0.05)  # polling readiness

    def close(self) -> None:
        self.closed = True
        for server in self.servers:
            with contextlib.suppress(Exception):
                if server.proc is not None:
                    server.stop(signal.SIGKILL)
        self.s3.close()
        self.redis.close()
