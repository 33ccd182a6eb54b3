"""What each mirror currently reflects, per table: a Redis hash per super and format
(``<p>:{org/super}:mirror:<format>``), written in the same atomic step as the mirror
runner's checkpoint. It is what the API shows and what the Iceberg REST catalog serves
(the current metadata file); the mirror's own commit stays the authority on what it
holds (see ``mirrors/runner.py``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from events.redis_log import Keys, guarded


def group(fmt: str) -> str:
    """The consumer group (and checkpoint name) of a format's mirror runner."""
    return f"mirror-{fmt}"


class MirrorInfo(msgspec.Struct, frozen=True):
    """A table's mirror in one format, as the API shows it."""

    format: str
    enabled: bool
    location: str | None
    metadata_location: str | None
    version: int | None
    lag_versions: int
    lag_seconds: float
    published_at: datetime | None
    error: str | None
    note: str | None = None


class MirrorStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """One table's mirror in one format. ``version``/``position``: the table version
    and stream id the mirror reflects. ``error``: why the last publish failed (the
    mirror then still shows ``version``; the next change or runner start retries)."""

    format: str
    location: str
    version: int
    position: str
    incarnation: str
    published_at: datetime
    metadata_location: str | None = None
    error: str | None = None
    note: str | None = None


_decoder = msgspec.json.Decoder(MirrorStatus)
_encoder = msgspec.json.Encoder()


def encode_status(status: MirrorStatus) -> bytes:
    return _encoder.encode(status)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MirrorStatuses:
    """Reads the status hashes."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def key(self, org: str, super_: str, fmt: str) -> str:
        return f"{self.keys.tag(org, super_)}:mirror:{fmt}"

    async def of_super(self, org: str, super_: str, fmt: str) -> dict[str, MirrorStatus]:
        raw: Any = await guarded(self.client.hgetall(self.key(org, super_, fmt)))
        return {_text(k): _decoder.decode(v) for k, v in raw.items()}

    async def of_table(
        self, org: str, super_: str, table: str, formats: tuple[str, ...]
    ) -> dict[str, MirrorStatus]:
        out = {}
        for fmt in formats:
            raw = await guarded(self.client.hget(self.key(org, super_, fmt), table))
            if raw is not None:
                out[fmt] = _decoder.decode(raw)
        return out
