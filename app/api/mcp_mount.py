"""The MCP endpoint inside the API: streamable HTTP (stateless) at ``/mcp``, behind the
bearer gate, and its RFC 9728 metadata. Its tools call this very app in process with the
caller's token, so the API's checks apply to each of their requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
from litestar import Litestar, Request, asgi, get
from litestar.types import Receive, Scope, Send

from app.mcp.backend import Backend, McpConfig
from app.mcp.gate import METADATA_PATHS, BearerGate, base_url, protected_resource_metadata
from app.mcp.server import build_server, streamable_app
from app.settings import Settings


class McpMount:
    """The MCP server, its gate and its route handlers, for one API app."""

    def __init__(self, settings: Settings) -> None:
        self.backend = Backend(McpConfig.from_settings(settings))
        self.server = build_server(self.backend)
        # (Starlette's ASGI types, which Litestar's typed dicts do not match nominally.)
        self.app: Any = BearerGate(
            streamable_app(self.server, "/"), self.backend, settings.public_url
        )
        self.started = False
        mount = self

        @asgi("/mcp", is_mount=True, copy_scope=True)
        async def mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            await mount.app(scope, receive, send)

        @get(list(METADATA_PATHS), include_in_schema=False)
        async def mcp_metadata(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """RFC 9728 metadata of the MCP endpoint (how clients find the authorization
            server)."""
            base = base_url(cast(Any, request.scope), settings.public_url)
            return protected_resource_metadata(base, settings)

        self.handlers = [mcp_endpoint, mcp_metadata]

    @asynccontextmanager
    async def running(self, app: Litestar) -> AsyncIterator[None]:
        """The in-process client the tools call the API with, and the SDK's session
        manager, for the app's lifespan."""
        if self.started:
            # The SDK's session manager runs once: a second start of this app (tests
            # reuse apps) gets a new one.
            self.app.app = streamable_app(self.server, "/")
        self.started = True
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=cast(Any, app)),
                base_url="http://ledgerlake.internal",
            ) as self.backend.client,
            self.server.session_manager.run(),
        ):
            yield
