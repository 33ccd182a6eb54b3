"""What a write is asked and answers: names, the ingest request and result, and the
idempotency token every append carries (with what it records for a retry).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from events.errors import InvalidInput

NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


MODES = ("append", "overwrite")


def check_name(kind: str, name: str) -> str:
    """Org, super and table names: lowercase identifiers (no dots, slashes or spaces)."""
    if not NAME.match(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use 1-63 characters a-z, 0-9 and _, "
            "not starting with a digit",
            code="invalid_name",
        )
    return name


@dataclass(frozen=True)
class IngestRequest:
    org: str
    super_: str
    table: str
    source: Path
    fmt: str
    mode: str = "append"
    if_match: int | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""
    actor: str = "anonymous"
    request_id: str = ""


class IngestResult(msgspec.Struct, frozen=True):
    table: str
    version: int
    rows: int
    event_id: str
    mode: str
    replayed: bool = False


class StoredIngest(msgspec.Struct, frozen=True):
    """What an append records with its idempotency token, for a retry to answer with."""

    table: str
    rows: int
    mode: str
    file: str = ""


# Every append carries a token (the client's Idempotency-Key, or one of ours), so that
# re-running the script after a lost reply returns the first outcome instead of
# appending twice. Our own tokens only need to outlive the client's retries.
INTERNAL_TOKEN_TTL_S = 600


def append_token(idempotency_key: str | None, fingerprint: str) -> tuple[str, str, int | None]:
    """(key, fingerprint, ttl) guarding an append: the client's Idempotency-Key, or a
    random one of ours."""
    if idempotency_key is not None:
        return idempotency_key, fingerprint, None
    internal = f"w:{uuid.uuid4().hex}"
    return internal, internal, INTERNAL_TOKEN_TTL_S


def replayed_result(result: bytes, version: int, event_ids: tuple[str, ...]) -> IngestResult:
    """The answer to a retried request: what the first one recorded."""
    extra = msgspec.json.decode(result, type=StoredIngest)
    return IngestResult(
        table=extra.table,
        version=version,
        rows=extra.rows,
        event_id=event_ids[-1],
        mode=extra.mode,
        replayed=True,
    )
