"""What the route modules share: path and header parameters, the documented error
responses, and the target of a table change (name checks, If-Match, Idempotency-Key).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec
from litestar import Request
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, PathParameter

from app.api.guards import actor_for, request_id
from app.api.schemas import ErrorResponse
from app.write.changes.commit import Target
from app.write.request import check_name
from events.errors import InvalidInput

SuperName = Annotated[str, PathParameter(name="super", description="the super table (catalog)")]


# Error responses, for the OpenAPI document (the body is always ErrorResponse).
def error_responses(*codes: int, notes: dict[int, str] | None = None) -> dict[int, ResponseSpec]:
    """The ErrorResponse of each status, described (``notes`` replaces descriptions)."""
    described = {
        400: "bad input or a refused query", 401: "missing or wrong bearer token",
        403: "visible but not allowed to the caller",
        404: "unknown (or not granted) org, super or table",
        408: "the query ran past its timeout",
        409: "If-Match is stale, or the table kept changing (details.current_version)",
        410: "that table version has expired", 413: "body larger than the limit",
        415: "unsupported Content-Type", 422: "type mismatch, or a reused Idempotency-Key",
        429: "over the caller's rate limit; see Retry-After",
        503: "Redis or storage unreachable; retry",
    }  # fmt: skip
    described.update(notes or {})
    return {c: ResponseSpec(ErrorResponse, description=described[c]) for c in codes}


IfMatch = Annotated[
    str | None, HeaderParameter(name="If-Match", description="expected table version")
]


IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", description="retries return the first result"),
]


def parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(
            f"If-Match must be a table version number, not {value!r}", code="invalid_if_match"
        ) from None


def body_fingerprint(path: str, body: Any) -> str:
    return hashlib.sha256(path.encode() + b"|" + msgspec.json.encode(body)).hexdigest()


def change_target(
    request: Request[Any, Any, Any],
    org: str,
    super_name: str,
    table: str,
    if_match: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> Target:
    for kind, name in (("org", org), ("super", super_name), ("table", table)):
        check_name(kind, name)
    return Target(
        org,
        super_name,
        table,
        actor=actor_for(request),
        request_id=request_id(request),
        if_match=parse_if_match(if_match),
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
