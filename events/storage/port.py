"""The ``Storage`` port: where immutable data files live, and how their keys are made.

Files are built in a local staging directory and then *published* under their final key.
Publishing is atomic (rename, or a completed upload on S3), so a reader never sees a
partial file, and a key that no event references is an invisible orphan.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    """Where data files live."""

    async def start(self) -> None:
        """Connect (and create the bucket, where that applies)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    def staging_file(self, suffix: str = "") -> Path:
        """A fresh local path to build a file in before publishing it."""
        ...

    async def publish(self, staged: Path, key: str) -> int:
        """Move a staged file to ``key`` durably and atomically; return its size."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    async def read(self, key: str) -> bytes | None:
        """The bytes of ``key`` (small objects: manifests, archive segments), or None if
        it does not exist."""
        ...

    def engine_path(self, key: str) -> str:
        """The path or URL under which DuckDB reads ``key``."""
        ...

    def engine_secret(self) -> dict[str, str] | None:
        """Credentials DuckDB needs to read ``engine_path`` URLs (an S3 secret), if any."""
        ...

    def list_objects(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        """Every stored object under ``prefix``, with its size and modification time."""
        ...


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime


def data_file_key(org: str, super_: str, table: str) -> str:
    """A new, unique key for a table's data file."""
    return f"{org}/{super_}/{table}/data/{uuid.uuid4().hex}.parquet"
