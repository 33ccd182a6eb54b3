"""The local-directory storage backend (the embedded default).

Publishing is fsync + rename + fsync of the directory, so a file referenced by an
acknowledged event survives a power cut.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio

from events.storage.port import StoredObject


class LocalStorage:
    """A local directory. Publishing is fsync + rename + fsync of the directory, so a
    file referenced by an acknowledged event survives a power cut."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._root_str = str(self.root)
        self.staging = self.root / "_staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def staging_file(self, suffix: str = "") -> Path:
        return self.staging / f"{uuid.uuid4().hex}{suffix}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    async def publish(self, staged: Path, key: str) -> int:
        target = self._path(key)
        return await anyio.to_thread.run_sync(_publish_local, staged, target)

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(lambda: self._path(key).unlink(missing_ok=True))

    async def exists(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self._path(key).exists)

    async def read(self, key: str) -> bytes | None:
        path = self._path(key)

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return await anyio.to_thread.run_sync(read)

    def engine_path(self, key: str) -> str:
        # Lexical, not resolve(): a query names every file of its tables, and a
        # realpath per file per query was a tenth of a point lookup's time.
        path = os.path.normpath(os.path.join(self._root_str, key))
        if not path.startswith(self._root_str + os.sep):
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def engine_secret(self) -> dict[str, str] | None:
        return None

    async def list_objects(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        base = self._path(prefix) if prefix else self.root

        def scan() -> list[StoredObject]:
            found = []
            for path in base.rglob("*") if base.exists() else ():
                if path.is_file() and self.staging not in path.parents:
                    st = path.stat()
                    modified = datetime.fromtimestamp(st.st_mtime, UTC)
                    key = str(path.relative_to(self.root))
                    found.append(StoredObject(key, st.st_size, modified))
            return found

        for obj in await anyio.to_thread.run_sync(scan):
            yield obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(staged: Path, target: Path) -> int:
    with open(staged, "rb+") as fh:
        os.fsync(fh.fileno())
        size = os.fstat(fh.fileno()).st_size
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    _fsync_dir(target.parent)
    if created:
        _fsync_dir(target.parent.parent)
    return size
