"""An async client of Ledgerlake's own HTTP API, for the MCP tools.

The MCP tools reach the catalog only through this client, with the caller's own bearer
token: inside ``serve`` it calls the app in process (ASGI, no socket), and for
``ledgerlake mcp`` it calls a running server at ``LEDGERLAKE_URL``. Either way the API's
authentication, tenancy, authorization, row-level security, limits, rate limits and
audit apply to every call, exactly as for any other client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx


class ApiError(Exception):
    """A refusal of the API: its status, error code and message (as the API said it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def path(*parts: str) -> str:
    """``/v1/<part>/<part>...`` with each part escaped (names come from the caller)."""
    return "/v1/" + "/".join(quote(p, safe="") for p in parts)


class LedgerlakeApi:
    """Calls of one caller (one bearer token) over a shared ``httpx.AsyncClient``."""

    def __init__(
        self, client: httpx.AsyncClient, authorization: str, deadline: float | None = None
    ) -> None:
        self.client = client
        self.authorization = authorization
        self.deadline = deadline  # anyio.current_time() by which the caller must be done

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """The response's JSON; an ``ApiError`` for any 4xx/5xx."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self.client.request(
                method,
                url,
                params=query,
                json=json,
                headers={"Authorization": self.authorization},
            )
        except httpx.HTTPError as exc:
            raise ApiError(503, "api_unreachable", f"Ledgerlake is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise api_error(response)
        return response.json()

    async def get(self, url: str, **params: Any) -> Any:
        return await self.request("GET", url, params=params)

    async def post(self, url: str, body: Any) -> Any:
        return await self.request("POST", url, json=body)


def api_error(response: httpx.Response) -> ApiError:
    """The refusal in an API response: its ``{"error": {"code", "message"}}``, or the
    status and the start of the body for anything else (a proxy's page, say)."""
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text[:300] or response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)
