"""How the MCP tools reach the API: the server's limits (``McpConfig``) and the
``Backend`` that gives each tool call its credential, its concurrency slot and its
timeout, and turns the API's refusals into tool errors."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from app.mcp.budget import CallLimiter, describe_error
from app.mcp.client import ApiError, LedgerlakeApi
from app.settings import Settings


@dataclass(frozen=True)
class McpConfig:
    token_budget: int = 25_000
    timeout_s: float = 60.0
    max_concurrent: int = 32
    max_concurrent_per_principal: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> McpConfig:
        return cls(
            token_budget=settings.mcp_token_budget,
            timeout_s=settings.mcp_timeout_s,
            max_concurrent=settings.mcp_max_concurrent,
            max_concurrent_per_principal=settings.mcp_max_concurrent_per_principal,
        )


def _digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()


@dataclass
class Backend:
    """How the tools reach the API: a shared HTTP client (in process or remote) and
    where a call's credential comes from (the HTTP request's ``Authorization``, or the
    fixed token of a stdio server)."""

    config: McpConfig
    client: httpx.AsyncClient | None = None
    token: str | None = None
    limiter: CallLimiter = field(init=False)
    # Which principal a credential is (filled by the HTTP gate, which asks the API).
    # Only the concurrency limit keys on it; every call is authorised by the API.
    principals: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.limiter = CallLimiter(
            self.config.max_concurrent, self.config.max_concurrent_per_principal
        )

    def api(self, authorization: str) -> LedgerlakeApi:
        if self.client is None:
            raise ToolError("the MCP server is not running")
        return LedgerlakeApi(self.client, authorization)

    def remember(self, authorization: str, principal_id: str) -> None:
        key = _digest(authorization)
        self.principals[key] = principal_id
        self.principals.move_to_end(key)
        while len(self.principals) > 10_000:
            self.principals.popitem(last=False)

    def authorization(self, ctx: Context) -> str:
        headers = ctx.headers
        if headers is not None:  # HTTP: the caller's own credential
            value = headers.get("authorization", "")
            if value:
                return value
            raise ToolError("this request carries no Authorization header")
        if self.token:
            return f"Bearer {self.token}"
        raise ToolError("no Ledgerlake token is configured (set LEDGERLAKE_TOKEN)")

    @asynccontextmanager
    async def call(self, ctx: Context) -> AsyncIterator[LedgerlakeApi]:
        """One tool call: its concurrency slot, its timeout, and API refusals turned
        into tool errors with the API's code and message."""
        authorization = self.authorization(ctx)
        digest = _digest(authorization)
        principal = self.principals.get(digest, digest)
        async with self.limiter.slot(principal):
            try:
                with anyio.fail_after(self.config.timeout_s):
                    api = self.api(authorization)
                    api.deadline = anyio.current_time() + self.config.timeout_s
                    yield api
            except TimeoutError:
                raise ToolError(
                    f"the call took longer than {self.config.timeout_s:g}s and was stopped; "
                    "narrow it (filters, LIMIT, fewer columns, one table at a time)"
                ) from None
            except ApiError as exc:
                raise ToolError(describe_error(exc)) from None
