"""Production Redis: a password, TLS (rediss://), Sentinel and Cluster, each real, each on
127.0.0.1 and free ports, each started and stopped by its test."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.embedded_redis import find_redis_server
from app.services import Services
from app.settings import Settings
from projections.replay import replay
from tests.conftest import authed, free_port

pytestmark = pytest.mark.slow


def wait_for_ping(proc: subprocess.Popen[bytes], port: int, password: str | None = None) -> None:
    client = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
    for _ in range(1000):
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            assert proc.poll() is None, "server exited"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.01)  # waiting for the server to come up
    raise RuntimeError("server did not come up")


@contextlib.contextmanager
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def start(procs: list[subprocess.Popen[bytes]], workdir: Path, *args: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    procs.append(
        subprocess.Popen(
            [find_redis_server(), *args],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def round_trip(settings: Settings) -> None:
    """Writes to two supers, a query, the audit log and an exact projection."""
    with authed(TestClient(create_app(settings, settings.redis_url))) as c:
        for sup in ("s1", "s2"):
            for i in range(3):
                r = c.post(f"/v1/a/{sup}/tables/t/rows", json=[{"x": i}])
                assert r.status_code == 200, r.text
        q = c.post("/v1/a/s2/query", json={"sql": "select sum(x) from t"})
        assert q.json()["rows"] == [[3]]
        assert len(c.get("/v1/events?org=a").json()["events"]) == 3 + 2 * 4
        assert c.get("/health").json()["status"] == "ok"

    async def exact() -> None:
        services = Services.build(settings)
        try:
            await services.projector().run_until_caught_up()
            report = await replay(services.log, services.store, verify=True)
            assert report.supers == 2 and report.differences == []
        finally:
            await services.close()

    anyio.run(exact)


def test_password_protected_redis(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    with servers() as procs:
        start(procs, tmp_path / "r", "--bind", "127.0.0.1", "--port", str(port),
              "--save", "", "--requirepass", "s3cret")  # fmt: skip
        wait_for_ping(procs[0], port, password="s3cret")
        round_trip(
            msgspec.structs.replace(settings, redis_url=f"redis://:s3cret@127.0.0.1:{port}/0")
        )
        wrong = msgspec.structs.replace(settings, redis_url=f"redis://:nope@127.0.0.1:{port}/0")
        with authed(TestClient(create_app(wrong, wrong.redis_url, run_projector=False))) as c:
            assert c.get("/health").status_code == 503


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def tls_terminator(cert: Path, key: Path, target_port: int) -> Iterator[int]:
    """TLS in front of redis-server (the shipped binary is built without TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        box["port"] = server.sockets[0].getsockname()[1]
        box["task"] = asyncio.current_task()
        ready.set()
        await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield int(box["port"])
    finally:
        loop.call_soon_threadsafe(box["task"].cancel)
        thread.join(10)


def test_tls_redis_url(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    cert, key = self_signed(tmp_path)
    with servers() as procs:
        start(procs, tmp_path / "r", "--bind", "127.0.0.1", "--port", str(port), "--save", "")
        wait_for_ping(procs[0], port)
        with tls_terminator(cert, key, port) as tls_port:
            url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
            round_trip(msgspec.structs.replace(settings, redis_url=url))


def test_sentinel(settings: Settings, tmp_path: Path) -> None:
    master, sentinel = free_port(), free_port()
    conf = tmp_path / "s" / "sentinel.conf"
    conf.parent.mkdir()
    conf.write_text(
        f"bind 127.0.0.1\nport {sentinel}\n"
        f"sentinel monitor ledger 127.0.0.1 {master} 1\n"
        "sentinel auth-pass ledger masterpw\n"
        "sentinel down-after-milliseconds ledger 5000\n"
    )
    with servers() as procs:
        start(procs, tmp_path / "m", "--bind", "127.0.0.1", "--port", str(master), "--save", "",
              "--requirepass", "masterpw")  # fmt: skip
        wait_for_ping(procs[0], master, password="masterpw")
        start(procs, conf.parent, str(conf), "--sentinel")
        wait_for_ping(procs[1], sentinel)
        via_sentinel = msgspec.structs.replace(
            settings,
            redis_url=None,
            redis_sentinels=f"127.0.0.1:{sentinel}",
            redis_sentinel_master="ledger",
            redis_password="masterpw",
        )
        round_trip(via_sentinel)
        direct = redis.Redis(port=master, password="masterpw")
        assert direct.exists(f"{settings.redis_prefix}:{{a/s1}}:events")  # it went there
        direct.close()


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def test_cluster(settings: Settings, tmp_path: Path) -> None:
    ports = [free_cluster_port() for _ in range(3)]
    with servers() as procs:
        for p in ports:
            start(procs, tmp_path / str(p), "--bind", "127.0.0.1", "--port", str(p), "--save", "",
                  "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")  # fmt: skip
            wait_for_ping(procs[-1], p)
        cli = Path(find_redis_server()).with_name("redis-cli")
        made = subprocess.run(
            [str(cli if cli.exists() else "redis-cli"), "--cluster", "create",
             *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        node = redis.Redis(port=ports[0])
        for _ in range(500):  # the cluster agrees on its slots shortly after creation
            if b"cluster_state:ok" in node.execute_command("CLUSTER INFO"):
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[0].wait(timeout=0.01)
        node.close()
        prefix = f"c{uuid.uuid4().hex[:6]}"
        round_trip(
            msgspec.structs.replace(
                settings,
                redis_url=f"redis://127.0.0.1:{ports[0]}/0",
                redis_cluster=True,
                redis_prefix=prefix,
            )
        )
