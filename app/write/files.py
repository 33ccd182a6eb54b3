"""Data files of a write: an inlined batch for a tiny one, else a Parquet file written
in a staging file and published under a fresh key; and deleting one no event references.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pyarrow as pa

from app.write.bodies import Plan, Source, WrittenFile, conform_table, write_parquet
from app.write.request import IngestRequest
from events.model import DataFile
from events.storage.port import Storage, data_file_key
from projections.query.views import inline_bytes

T = TypeVar("T")

# Bodies up to this size are parsed on the event loop: a worker thread's round trip
# cost more than the work (a single-row write made two of them).
SMALL_BODY = 16 * 1024


async def off_loop(body: Path, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, or at once for a small body."""
    if os.stat(body).st_size <= SMALL_BODY:  # the staged body's inode: no disk access
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


class DataFileWriter:
    """Writes and publishes the data files of writes and changes (a part of ``Writer``)."""

    storage: Storage
    row_group_rows: int
    zstd_level: int
    inline_max_rows: int
    inline_max_bytes: int

    async def discard(self, data_file: DataFile) -> None:
        """Delete a published file no event references (inlined batches have none)."""
        if not data_file.is_inline:
            await self.storage.delete(data_file.path)

    def fits_inline(self, size_bytes: int) -> bool:
        """Whether a body of this size may be small enough to inline (the rows and the
        encoded size decide)."""
        return self.inline_max_rows > 0 and size_bytes <= 4 * self.inline_max_bytes

    def inline_file(self, table: pa.Table, written: WrittenFile) -> DataFile | None:
        """``table`` as an inlined batch, if it is under both inlining thresholds."""
        if table.num_rows > self.inline_max_rows:
            return None
        data = inline_bytes(table)
        if len(data) > self.inline_max_bytes:
            return None
        return DataFile(
            path=f"inline/{uuid.uuid4().hex}",
            rows=table.num_rows,
            size_bytes=len(data),
            columns=written.stats,
            inline=data,
        )

    async def _materialize(
        self,
        req: IngestRequest,
        source: Source,
        plan: Plan,
        progress: Callable[[int], None] | None,
    ) -> tuple[WrittenFile, DataFile]:
        """An inlined batch for a tiny write, else a published Parquet file."""
        small = source.rows is None or source.rows <= self.inline_max_rows
        if small and self.fits_inline(req.source.stat().st_size):
            table, written = await off_loop(req.source, conform_table, source, plan)
            inline = self.inline_file(table, written)
            if inline is not None:
                return written, inline
        return await self.write_file(req.org, req.super_, req.table, source, plan, progress)

    async def write_file(
        self,
        org: str,
        super_: str,
        table: str,
        source: Source,
        plan: Plan,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[WrittenFile, DataFile]:
        staged = self.storage.staging_file(".parquet")
        try:
            written = await anyio.to_thread.run_sync(
                lambda: write_parquet(
                    source,
                    plan,
                    staged,
                    row_group_rows=self.row_group_rows,
                    zstd_level=self.zstd_level,
                    progress=progress,
                )
            )
            key = data_file_key(org, super_, table)
            size = await self.storage.publish(staged, key)
        finally:
            staged.unlink(missing_ok=True)
        return written, DataFile(
            path=key, rows=written.rows, size_bytes=size, columns=written.stats
        )
