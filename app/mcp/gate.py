"""HTTP in front of the MCP endpoint: the bearer gate and the endpoint's OAuth Protected
Resource Metadata (RFC 9728), through which MCP clients find the authorization server."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.mcp.backend import Backend
from app.mcp.client import ApiError
from app.settings import Settings

PRM_PATH = "/.well-known/oauth-protected-resource/mcp"
"""Where the MCP endpoint's OAuth Protected Resource Metadata (RFC 9728) is served: the
well-known path with the resource's path inserted, and the root form some clients try."""
METADATA_PATHS = (PRM_PATH, "/.well-known/oauth-protected-resource")


_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def base_url(scope: Scope, public_url: str | None) -> str:
    """The service's external base URL: ``LEDGERLAKE_PUBLIC_URL``, else the request's
    scheme and Host (forwarded headers are not trusted: behind a proxy, set the
    setting), a Host that is not a plain host name counting as ``localhost``."""
    if public_url:
        return public_url.rstrip("/")
    headers = dict(scope.get("headers") or [])
    host = headers.get(b"host", b"").decode("latin-1")
    if not _HOST.match(host):
        host = "localhost"
    return f"{scope.get('scheme', 'http')}://{host}"


def protected_resource_metadata(base: str, settings: Settings) -> dict[str, Any]:
    """RFC 9728 metadata of the MCP endpoint: the resource, how to present a token and
    the authorization servers that issue them (``LEDGERLAKE_MCP_AUTHORIZATION_SERVERS``,
    else the JWT issuer; none when only Ledgerlake API tokens are used)."""
    servers = [s.strip() for s in settings.mcp_authorization_servers.split(",") if s.strip()]
    if not servers and settings.jwt_issuer:
        servers = [settings.jwt_issuer]
    doc: dict[str, Any] = {
        "resource": f"{base}/mcp",
        "bearer_methods_supported": ["header"],
        "resource_name": "Ledgerlake",
    }
    if servers:
        doc["authorization_servers"] = servers
    if settings.jwt_required_scopes.split():
        doc["scopes_supported"] = settings.jwt_required_scopes.split()
    return doc


class BearerGate:
    """In front of the MCP endpoint: a request without a credential the API accepts
    gets 401 with ``WWW-Authenticate: Bearer resource_metadata=...`` (how MCP clients
    discover the authorization server). The API itself checks each tool call again."""

    def __init__(self, app: ASGIApp, backend: Backend, public_url: str | None) -> None:
        self.app, self.backend, self.public_url = app, backend, public_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/.well-known/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET":
            # No server-initiated messages in stateless operation: no SSE stream to open
            # (the spec's answer for that is 405).
            await send_json(send, 405, {"error": {"code": "method_not_allowed",
                                                  "message": "POST JSON-RPC to this endpoint"}},
                            [(b"allow", b"POST, DELETE")])  # fmt: skip
            return
        values = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(values) > 1:  # the gate and the tools must see the same one
            await self._refuse(scope, send, 400, "invalid_request",
                               "send one Authorization header", invalid=False)  # fmt: skip
            return
        authorization = values[0].decode("latin-1") if values else ""
        if not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            await self._refuse(scope, send, 401, "unauthorized",
                               "send Authorization: Bearer <token>", invalid=False)  # fmt: skip
            return
        try:
            who = await self.backend.api(authorization).get("/v1/whoami")
        except ApiError as exc:
            if exc.status == 401:
                await self._refuse(scope, send, 401, exc.code, exc.message, invalid=True)
            elif exc.status == 429:
                await self._refuse(scope, send, 429, exc.code, exc.message, invalid=False)
            else:
                await self._refuse(scope, send, 503, exc.code, exc.message, invalid=False)
            return
        self.backend.remember(authorization, who["principal"]["id"])
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, send: Send, status: int, code: str, message: str, *, invalid: bool
    ) -> None:
        headers = []
        if status == 401:
            metadata = base_url(scope, self.public_url) + PRM_PATH
            challenge = f'Bearer realm="ledgerlake", resource_metadata="{metadata}"'
            if invalid:
                challenge += ', error="invalid_token"'
            headers.append((b"www-authenticate", challenge.encode()))
        await send_json(send, status, {"error": {"code": code, "message": message}}, headers)


async def send_json(
    send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(doc).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
