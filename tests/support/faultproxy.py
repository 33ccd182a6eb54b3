"""A TCP proxy for fault injection: forwards traffic until a byte budget (client to
server) is spent, then cuts every connection and refuses new ones."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CuttingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.budget: int | None = None  # None: unlimited
        self.cut = False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._server.serve_forever()

        self._task = self._loop.create_task(serve())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.cut:
            cw.transport.abort()
            return
        sr, sw = await asyncio.open_connection(*self.target)
        self._writers |= {cw, sw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(65536):
                    if up and self.budget is not None:
                        self.budget -= len(data)
                        if self.budget < 0:
                            self._cut_all()
                            return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))

    def _cut_all(self) -> None:
        self.cut = True
        for w in list(self._writers):
            w.transport.abort()

    def cut_after(self, nbytes: int) -> None:
        """From now on, cut everything once ``nbytes`` more bytes went upstream."""
        self._loop.call_soon_threadsafe(setattr, self, "budget", nbytes)

    @contextmanager
    def running(self) -> Iterator[CuttingProxy]:
        self._thread.start()
        self._ready.wait(10)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._cut_all)
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(10)
