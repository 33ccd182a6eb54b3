"""Redis killed in the middle of a load and restarted from its append-only file: every
acknowledged write is there, the service reconnects by itself, and the projector
catches up with nothing applied twice."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import uuid
from pathlib import Path

import anyio
import msgspec
import pytest
import redis
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.embedded_redis import find_redis_server
from app.services import Services
from app.settings import Settings
from projections.replay import rebuild_super
from projections.store import encode_table
from tests.conftest import authed, free_port


def start_durable_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(1000):
        try:
            client.ping()
            client.close()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server exited"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.01)  # waiting for the server to come up
    raise RuntimeError("redis-server did not start")


@pytest.mark.slow
def test_acknowledged_writes_survive_a_redis_kill_and_restart(
    settings: Settings, tmp_path: Path
) -> None:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    port = free_port()
    server = start_durable_redis(workdir, port)
    url = f"redis://127.0.0.1:{port}/0"
    durable = msgspec.structs.replace(settings, redis_url=url, redis_prefix=uuid.uuid4().hex[:8])
    acknowledged: list[int] = []
    failed = 0
    try:
        with authed(TestClient(create_app(durable, url))) as c:
            for i in range(60):
                if i == 20:
                    server.send_signal(signal.SIGKILL)
                    server.wait()
                    health = c.get("/health")
                    assert health.status_code == 503 and health.json()["status"] == "degraded"
                if i == 30:
                    server = start_durable_redis(workdir, port)
                r = c.post("/v1/a/b/tables/t/rows", json=[{"i": i}])
                if r.status_code == 200:
                    acknowledged.append(i)
                else:
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "unavailable"
                    failed += 1
            assert failed == 10  # exactly the writes made while Redis was down
            q = c.post("/v1/a/b/query", json={"sql": "select i from t order by i"})
            assert [row[0] for row in q.json()["rows"]] == acknowledged
            assert c.get("/health").json()["status"] == "ok"

        async def projector_is_exact() -> None:
            services = Services.build(durable, url)
            try:
                await services.projector().run_until_caught_up()
                stored = await services.store.load_super("a", "b")
                rebuilt, _ = await rebuild_super(services.log, "a", "b")
                assert stored.position == rebuilt.position
                assert encode_table(stored.tables["t"]) == encode_table(rebuilt.tables["t"])
                assert stored.tables["t"].row_count == len(acknowledged)
            finally:
                await services.close()

        anyio.run(projector_is_exact)
    finally:
        server.kill()
        server.wait()
