"""Shared fixtures: one real redis-server for the session (127.0.0.1, free port),
a fresh key prefix and data dir per test, and the app under Litestar's test client."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.embedded_redis import find_redis_server
from app.services import Services
from app.settings import Settings

# The fixtures of real ``ledgerlake`` processes (``procs``, ``start_server``).
pytest_plugins = ["tests.support.processes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(
    workdir: Path, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on 127.0.0.1 and a free port; waits until it answers PING."""
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir), *(extra or [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(500):
            if proc.poll() is not None:
                break  # port taken in the meantime: try another
            try:
                client.ping()
                client.close()
                return proc, f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.01)  # poll without a bare sleep
        proc.kill()
        proc.wait()
    raise RuntimeError("could not start redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Inlining is off here: these tests look at the Parquet files a write makes.
    Tests of inlining (and the model test) turn it on with msgspec.structs.replace.
    Mirrors and the archiver are off too (the background runners would publish or
    archive every table the other tests write); tests/mirrors and the archive tests
    turn them on."""
    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        inline_max_rows=0,
        mirrors="none",
        archive=False,
        api_token=ADMIN_TOKEN,
    )


# Every test's settings carry this static platform-admin token; ``authed`` makes a test
# client send it. Tests of principals, tokens and grants send their own.
ADMIN_TOKEN = "test-admin-token"
C = TypeVar("C", bound=httpx.Client)


def authed(client: C, token: str = ADMIN_TOKEN) -> C:
    client.headers["Authorization"] = f"Bearer {token}"
    return client


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Any]]:
    assert settings.redis_url
    with authed(TestClient(create_app(settings, settings.redis_url))) as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with Services.open(settings) as s:
        yield s


def ingest(client: TestClient[Any], path: str, body: Any, **kwargs: Any) -> Any:
    """POST rows as JSON (a list) or raw bytes with a content type."""
    if isinstance(body, bytes | str):
        return client.post(path, content=body, **kwargs)
    return client.post(path, json=body, **kwargs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, for the whole session."""
    from tests.support.s3server import start_s3

    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def any_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings on each storage backend: local disk, then S3."""
    if request.param == "local":
        return settings
    server = request.getfixturevalue("s3_server")
    import msgspec

    return msgspec.structs.replace(
        settings,
        storage_url=f"s3://ll-{uuid.uuid4().hex[:12]}/prefix",
        s3_endpoint_url=server.endpoint,
        s3_access_key_id=server.access_key,
        s3_secret_access_key=server.secret_key,
        s3_part_size=5 * 1024 * 1024,
    )
