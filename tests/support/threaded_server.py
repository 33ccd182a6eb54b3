"""An ASGI app under uvicorn on 127.0.0.1 and a free port, in a background thread of
the test process (its own event loop), for clients that need a real HTTP server."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import uvicorn

from tests.conftest import free_port


class ThreadedServer:
    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app = app
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def start(self, ready_path: str = "/health") -> None:
        self.thread.start()
        for _ in range(1500):
            if not self.thread.is_alive():
                break
            try:
                if self.http.get(ready_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            self.thread.join(timeout=0.02)  # readiness poll: wait a little, or notice a crash
        self.stop()
        raise RuntimeError("uvicorn did not start")

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"
