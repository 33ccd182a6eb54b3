"""Publishes one table's latest version to one mirror format, and removes a mirror.

The mirror libraries are synchronous; they run in worker threads. Publishing is
idempotent: before committing, the mirror's own last commit is compared with the table
(its ``ledgerlake.position`` and ``ledgerlake.incarnation``), so a runner that crashed
after a mirror commit but before its checkpoint does not commit the same change again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from events.model import DataFile, stream_id_tuple
from events.storage.port import Storage
from mirrors import delta, iceberg
from mirrors.access import Access
from mirrors.plan import (
    MirrorFile,
    copy_key,
    mirror_schema,
    needs_copy,
    table_prefix,
    to_mirror,
)
from mirrors.status import MirrorStatus
from projections.catalog import TableState
from projections.query.views import inline_table, live_mask

log = logging.getLogger("ledgerlake.mirrors")

NEEDS_COPY_CACHE = 100_000
# Where each format keeps its own metadata, under the table's prefix.
METADATA_DIR = {"delta": "_delta_log", "iceberg": "metadata"}


class Publisher:
    def __init__(
        self,
        fmt: str,
        storage: Storage,
        access: Access,
        *,
        checkpoint_interval: int = 10,
        retention_s: float = 3600.0,
        zstd_level: int = 3,
    ) -> None:
        self.fmt = fmt
        self.storage = storage
        self.access = access
        self.checkpoint_interval = checkpoint_interval
        self.retention_s = retention_s
        self.zstd_level = zstd_level
        # Data files are immutable: whether each needs a copy (bounded LRU). Copies are
        # not cached: another process may have removed them (a format turned off).
        self._needs_copy: OrderedDict[str, bool] = OrderedDict()

    async def publish(
        self, org: str, super_: str, table: TableState, previous: MirrorStatus | None
    ) -> MirrorStatus:
        prefix = table_prefix(org, super_, table.name)
        location = self.access.uri(prefix)
        schema = mirror_schema(table.columns, self.fmt)
        if not schema:
            # Every column is still untyped: neither format has a table without
            # columns. The mirror appears with the first typed column.
            await self.remove(org, super_, table.name)
            return MirrorStatus(
                format=self.fmt,
                location=location,
                version=table.version,
                position=table.last_event_id,
                incarnation=table.incarnation,
                published_at=datetime.now(UTC),
                note="no typed column yet: nothing to publish",
            )
        files = await self._files(org, super_, table, schema)
        metadata_location = None
        if self.fmt == "delta":
            await self._publish_delta(prefix, location, schema, files, table)
        else:
            metadata_location = await self._publish_iceberg(
                org, super_, location, schema, files, table, previous
            )
        return MirrorStatus(
            format=self.fmt,
            location=location,
            version=table.version,
            position=table.last_event_id,
            incarnation=table.incarnation,
            published_at=datetime.now(UTC),
            metadata_location=metadata_location,
        )

    async def _publish_delta(
        self,
        prefix: str,
        location: str,
        schema: pa.Schema,
        files: list[MirrorFile],
        table: TableState,
    ) -> None:
        """Commit the table to its Delta log, unless the log already has its position;
        a log that is unreadable, of another incarnation, ahead of the event log or
        half made starts over."""
        marks = await anyio.to_thread.run_sync(delta.committed, location, self.access.delta_options)
        if marks is None:
            # A log that cannot be loaded (say, half deleted by a crash): only a
            # mirror's own metadata, so start it over.
            log.warning("the Delta log of %s is unreadable; recreating it", prefix)
            await self._delete_prefix(f"{prefix}/{METADATA_DIR['delta']}/")
            marks = {}
        if marks and marks.get(delta.INCARNATION) != table.incarnation:
            await self._delete_prefix(f"{prefix}/{METADATA_DIR['delta']}/")
            marks = {}
        if marks and _before(table.last_event_id, marks.get(delta.POSITION, "")):
            # The mirror holds changes the log does not (the log was recovered from
            # an archive that missed its last writes, or Redis failed over): those
            # writes are gone, so the mirror starts over from the log.
            log.warning("the Delta mirror of %s is ahead of the log; recreating it", prefix)
            await self._delete_prefix(f"{prefix}/{METADATA_DIR['delta']}/")
            marks = {}
        if not marks or _before(marks.get(delta.POSITION, ""), table.last_event_id):
            fresh = not marks
            if fresh:  # a log left half-made by a crash before its first commit
                await self._delete_prefix(f"{prefix}/{METADATA_DIR['delta']}/")
            try:
                await anyio.to_thread.run_sync(
                    lambda: self._delta(prefix, schema, files, table, fresh)
                )
            except delta.SchemaConflict as exc:
                # A column came back with another type (Delta cannot drop or
                # retype one): start the Delta table over.
                log.warning("recreating the Delta mirror of %s: %s", prefix, exc)
                await self._delete_prefix(f"{prefix}/{METADATA_DIR['delta']}/")
                await anyio.to_thread.run_sync(
                    lambda: self._delta(prefix, schema, files, table, True)
                )

    async def _publish_iceberg(
        self,
        org: str,
        super_: str,
        location: str,
        schema: pa.Schema,
        files: list[MirrorFile],
        table: TableState,
        previous: MirrorStatus | None,
    ) -> str:
        """Commit the table as a new Iceberg metadata file (from the last one recorded,
        unless its incarnation differs); its location."""
        prefix = table_prefix(org, super_, table.name)
        current = previous.metadata_location if previous else None
        if previous is not None and previous.incarnation != table.incarnation:
            current = None
        if current is None:
            await self._delete_prefix(f"{prefix}/{METADATA_DIR['iceberg']}/")
        return await anyio.to_thread.run_sync(
            lambda: iceberg.publish(
                self.access.iceberg_props,
                (f"{org}.{super_}", table.name),
                location,
                current,
                schema,
                files,
                self.access.uri,
                version=table.version,
                position=table.last_event_id,
                incarnation=table.incarnation,
                retention_s=self.retention_s,
            )
        )

    def _delta(
        self,
        prefix: str,
        schema: pa.Schema,
        files: list[MirrorFile],
        table: TableState,
        fresh: bool,
    ) -> int:
        def relative(key: str) -> str:
            return key[len(prefix) + 1 :]

        return delta.publish(
            self.access.uri(prefix),
            self.access.delta_options,
            schema,
            files,
            relative,
            version=table.version,
            position=table.last_event_id,
            incarnation=table.incarnation,
            checkpoint_interval=self.checkpoint_interval,
            retention_s=self.retention_s,
            fresh=fresh,
        )

    async def remove(self, org: str, super_: str, table: str) -> None:
        """Delete the mirror's metadata and copies (the table was dropped, or this
        format was turned off for it). Canonical data files are never touched."""
        prefix = table_prefix(org, super_, table)
        await self._delete_prefix(f"{prefix}/{METADATA_DIR[self.fmt]}/")
        await self._delete_prefix(f"{prefix}/mirror/{self.fmt}/")

    async def _delete_prefix(self, prefix: str) -> None:
        keys = [obj.key async for obj in self.storage.list_objects(prefix)]
        # The checkpoint hint first, then checkpoints, then commits: a half-deleted Delta
        # log is at worst unreadable, which the next publish repairs by starting over.
        keys.sort(key=lambda k: ("_last_checkpoint" not in k, "checkpoint" not in k, k))
        for key in keys:
            await self.storage.delete(key)

    # -- files --------------------------------------------------------------------------

    async def _files(
        self, org: str, super_: str, table: TableState, schema: pa.Schema
    ) -> list[MirrorFile]:
        prefix = table_prefix(org, super_, table.name)
        out = []
        for f in table.files:
            if not f.is_inline and f.deleted is None and not await self._must_copy(f):
                out.append(MirrorFile(f.path, f.path, f.rows, f.size_bytes, False))
                continue
            if f.live_rows == 0:
                continue  # every row deleted
            key = copy_key(prefix, f, self.fmt)
            size = await self._copy(f, key, schema)
            if size is None:
                continue  # no typed column yet: nothing a reader could read
            out.append(MirrorFile(key, f.path, f.live_rows, size, True))
        return out

    async def _must_copy(self, f: DataFile) -> bool:
        known = self._needs_copy.get(f.path)
        if known is None:
            fs, root = self.access.filesystem()
            schema = await anyio.to_thread.run_sync(
                lambda: pq.read_schema(fs.open_input_file(root + f.path))
            )
            known = self._needs_copy[f.path] = needs_copy(schema, self.fmt)
            while len(self._needs_copy) > NEEDS_COPY_CACHE:
                self._needs_copy.popitem(last=False)
        else:
            self._needs_copy.move_to_end(f.path)
        return known

    async def _copy(self, f: DataFile, key: str, schema: pa.Schema) -> int | None:
        fs, root = self.access.filesystem()

        def build() -> Any:
            info = fs.get_file_info(root + key)
            if info.size is not None and info.type.name == "File":
                return info.size  # copied before (by an earlier run)
            rows = inline_table(f) if f.is_inline else pq.read_table(root + f.path, filesystem=fs)
            if f.deleted is not None:
                rows = rows.filter(live_mask(f.deleted, rows.num_rows))
            converted = to_mirror(rows, self.fmt, schema)
            if converted is None:
                return None
            staged = self.storage.staging_file(".parquet")
            pq.write_table(
                converted,
                staged,
                compression="zstd",
                compression_level=self.zstd_level,
            )
            return staged

        built = await anyio.to_thread.run_sync(build)
        if built is None or isinstance(built, int):
            return built
        return await self.storage.publish(built, key)


def _before(a: str, b: str) -> bool:
    """Whether stream id ``a`` is before ``b`` (an empty id is before everything)."""
    return not a or stream_id_tuple(a) < stream_id_tuple(b)
