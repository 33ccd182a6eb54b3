"""An append whose reply is lost (the connection drops after Redis ran the script) is
retried by the client library; it must count once, and its file must survive."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from app.services import Services
from app.settings import Settings
from app.write.request import IngestRequest

pytestmark = pytest.mark.anyio


class ReplyDropper:
    """A TCP proxy to Redis. When armed, the first script call whose arguments contain
    ``marker`` is forwarded; Redis's reply is swallowed and the client's connection cut,
    exactly as if the network failed after the server did the work."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port, self.marker = port, marker
        self.armed = False
        self.dropped = 0
        # While > 0, such a call is not even forwarded: the connection is cut first.
        self.refuse = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        swallow = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.refuse and b"EVALSHA" in data.upper() and self.marker in data:
                    self.refuse -= 1
                    self.dropped += 1
                    client_w.transport.abort()
                    return
                if self.armed and b"EVALSHA" in data.upper() and self.marker in data:
                    self.armed = False
                    swallow.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if swallow.is_set():  # the script's reply: drop it and the connection
                    self.dropped += 1
                    client_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        server_w.close()


@pytest.fixture
async def flaky(settings: Settings) -> AsyncIterator[tuple[Services, ReplyDropper]]:
    assert settings.redis_url
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDropper(port, marker=b"RowsAppended")
    proxy_port = await proxy.start()
    flaky_settings = msgspec.structs.replace(
        settings, redis_url=f"redis://127.0.0.1:{proxy_port}/0"
    )
    services = Services.build(flaky_settings, flaky_settings.redis_url or "")
    yield services, proxy
    await services.close()
    await proxy.close()


async def ingest(services: Services, tmp: Path, rows: list[dict], **kw: object) -> object:
    src = tmp / f"body-{uuid.uuid4().hex}.json"
    src.write_text(json.dumps(rows))
    return await services.writer.ingest(IngestRequest("o", "s", "t", src, "json", **kw))  # type: ignore[arg-type]


async def table_state(services: Services) -> tuple[int, int, list[bool]]:
    table = (await services.reader.super_state("o", "s")).tables["t"]
    exists = [await services.storage.exists(f.path) for f in table.files]
    return table.version, table.row_count, exists


@pytest.mark.parametrize(
    "headers",
    [{}, {"if_match": 1}, {"idempotency_key": "k", "fingerprint": "fp"}],
    ids=["plain", "if_match", "idempotency_key"],
)
async def test_a_lost_reply_counts_once_and_keeps_the_file(
    flaky: tuple[Services, ReplyDropper], tmp_path: Path, headers: dict
) -> None:
    services, proxy = flaky
    await ingest(services, tmp_path, [{"x": 1}])
    proxy.armed = True
    result = await ingest(services, tmp_path, [{"x": 2}], **headers)
    assert proxy.dropped == 1  # the fault really happened
    assert result.version == 2 and not result.replayed  # type: ignore[attr-defined]
    version, rows, files_exist = await table_state(services)
    assert (version, rows) == (2, 2)  # appended exactly once
    assert all(files_exist)  # and no referenced file was deleted
    state = await services.reader.super_state("o", "s")
    got = await services.engine.run(state, "select x from t order by x")
    assert got.table.column("x").to_pylist() == [1, 2]


async def test_an_append_that_fails_after_the_upload_leaves_an_invisible_orphan(
    flaky: tuple[Services, ReplyDropper], tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from app.ops.gc import collect_garbage
    from events.errors import Unavailable

    services, proxy = flaky
    await ingest(services, tmp_path, [{"x": 1}])
    proxy.refuse = 10  # every attempt of the next append dies before reaching Redis
    with pytest.raises(Unavailable):
        await ingest(services, tmp_path, [{"x": 2}])
    proxy.refuse = 0
    data = services.settings.storage_root / "o" / "s" / "t" / "data"
    assert len(list(data.iterdir())) == 2  # the upload stays: its outcome was unknown
    version, rows, _ = await table_state(services)
    assert (version, rows) == (1, 1)  # ...but nothing references it: invisible
    later = datetime.now(UTC) + timedelta(hours=2)
    report = await collect_garbage(
        services.log, services.reader, services.storage,
        grace=timedelta(hours=1), dry_run=False, now=later,
    )  # fmt: skip
    assert report.deleted == 1 and report.referenced == 1
    assert len(list(data.iterdir())) == 1
