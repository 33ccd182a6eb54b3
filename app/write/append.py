"""The write path: validate, write the Parquet file, append the events.

Order matters (see docs/design.md): the data file is published *before* the event that
references it is appended, and a write is acknowledged only once that append returned.
If anything fails in between, the file is deleted (or, if the process dies, stays an
orphan no event references, invisible to every reader).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pyarrow as pa

from app.ops.gc import record_writer_grace
from app.write.bodies import (
    Plan,
    Source,
    WrittenFile,
    conform_table,
    open_source,
    plan_schema,
    write_parquet,
)
from events.errors import ConflictError, IdempotencyMismatch, InvalidInput
from events.log import NEW_TABLE, Idempotency
from events.model import (
    DataFile,
    EventBase,
    OrgCreated,
    RowsAppended,
    SchemaEvolved,
    SuperCreated,
    TableCreated,
    TableOverwritten,
    now,
)
from events.redis_log import RedisEventLog
from events.storage.port import Storage, data_file_key
from projections.catalog import TableState
from projections.query.views import inline_bytes
from projections.reader import CatalogReader

log = logging.getLogger("ledgerlake.writes")
T = TypeVar("T")

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


class _Stored(msgspec.Struct, frozen=True):
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


def _replayed(result: bytes, version: int, event_ids: tuple[str, ...]) -> IngestResult:
    """The answer to a retried request: what the first one recorded."""
    extra = msgspec.json.decode(result, type=_Stored)
    return IngestResult(
        table=extra.table,
        version=version,
        rows=extra.rows,
        event_id=event_ids[-1],
        mode=extra.mode,
        replayed=True,
    )


# Bodies up to this size are parsed on the event loop: a worker thread's round trip
# cost more than the work (a single-row write made two of them).
SMALL_BODY = 16 * 1024


async def _off_loop(body: Path, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, or at once for a small body."""
    if os.stat(body).st_size <= SMALL_BODY:  # the staged body's inode: no disk access
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


class _WaitedTooLong(Exception):
    """A staged file waited for its table's turn past ``max_file_age_s``."""


class _Turn:
    """The commit turn of one table among this process's writers, and how many commits
    they made (a writer that read the table before the last one must read again)."""

    __slots__ = ("__weakref__", "commits", "lock")

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.commits = 0


class Writer:
    """Turns ingest requests into files plus events."""

    def __init__(
        self,
        log: RedisEventLog,
        reader: CatalogReader,
        storage: Storage,
        *,
        row_group_rows: int = 131_072,
        zstd_level: int = 3,
        retries: int = 20,
        max_file_age_s: float = 1800.0,
        inline_max_rows: int = 0,
        inline_max_bytes: int = 0,
        mirrors: tuple[str, ...] = (),
    ) -> None:
        self.log = log
        self.reader = reader
        self.storage = storage
        self.row_group_rows = row_group_rows
        self.zstd_level = zstd_level
        self.retries = retries
        self.max_file_age_s = max_file_age_s
        self.inline_max_rows = inline_max_rows
        self.inline_max_bytes = inline_max_bytes
        # Mirror formats a new table gets (recorded in its TableCreated event).
        self.mirrors = mirrors
        # Called after an inlined batch was appended (the maintenance service flushes
        # inlined rows into Parquet once enough have accumulated).
        # Its argument is the table's inlined batches, including the new one.
        self.on_inline: Callable[[str, str, str, tuple[DataFile, ...]], Awaitable[None]] | None = (
            None
        )
        # Supers this process registered lately (monotonic time): the registry never
        # forgets one, so a write within a minute skips the round trip. (Bounded in time
        # so that a Redis that lost its data is repaired by the next write.)
        self._registered: dict[tuple[str, str], float] = {}
        # Tables with writers in flight here (an entry lives while a writer holds it).
        self._turns: weakref.WeakValueDictionary[tuple[str, str, str], _Turn] = (
            weakref.WeakValueDictionary()
        )
        self._grace_recorded = False

    async def ingest(
        self, req: IngestRequest, progress: Callable[[int], None] | None = None
    ) -> IngestResult:
        for kind, name in (("org", req.org), ("super", req.super_), ("table", req.table)):
            check_name(kind, name)
        if req.mode not in MODES:
            raise InvalidInput(
                f"mode must be one of {', '.join(MODES)}, not {req.mode!r}", code="invalid_mode"
            )
        if req.idempotency_key is not None:
            earlier = await self._earlier_result(req)
            if earlier is not None:
                return earlier
        # Writers of one table in this process take turns to commit, so that they do
        # not fail each other's compare-and-set: a writer that sees another commit
        # since its read folds the tail again under the turn, and appends at once
        # unless the schema moved. Other processes' writes are still retried below.
        turn = self._turn(req)
        seen = turn.commits
        table = (await self.reader.super_state(req.org, req.super_)).tables.get(req.table)
        self._check_if_match(req, table)
        known = {f.name: f.type for f in table.columns} if table else {}
        source = await _off_loop(req.source, open_source, req.source, req.fmt, known)

        written: WrittenFile | None = None
        data_file: DataFile | None = None
        registered = False
        published_at = 0.0
        token = append_token(req.idempotency_key, req.fingerprint)
        # True while an append is in flight: if it fails then (a lost connection), the
        # event may or may not be in the log, so the file must stay (an orphan at worst).
        unsure = False
        try:
            for attempt in range(self.retries + 1):
                plan = plan_schema(
                    table.columns if table else None, source.fields, text=source.text
                )
                # A file that waited too long for its append could be taken for an
                # orphan by `ledgerlake gc`: upload it again instead.
                stale = time.monotonic() - published_at > self.max_file_age_s
                if written is None or written.targets != plan.targets or stale:
                    # First try, or a concurrent writer changed the types this file must
                    # have: (re)write it against the current schema.
                    if data_file is not None:
                        await self.discard(data_file)
                    written, data_file = await self._materialize(req, source, plan, progress)
                    published_at = time.monotonic()
                assert data_file is not None
                if not registered:
                    await self.register(req.org, req.super_, req.actor, req.request_id)
                registered = True
                await self.record_grace()
                if time.monotonic() - published_at > self.max_file_age_s:
                    continue  # it waited too long (slow registry?): upload it again first
                try:
                    async with turn.lock:
                        if time.monotonic() - published_at > self.max_file_age_s:
                            raise _WaitedTooLong
                        if turn.commits != seen and req.if_match is None:
                            seen = turn.commits
                            state = await self.reader.super_state(req.org, req.super_)
                            now_ = state.tables.get(req.table)
                            if now_ is None or table is None or now_.columns != table.columns:
                                raise ConflictError("the schema moved", current_version=-1)
                            table = now_
                        unsure = True
                        result = await self._append(req, table, plan, written, data_file, token)
                        unsure = False
                        turn.commits += 1
                    if data_file.is_inline and self.on_inline is not None and not result.replayed:
                        kept = table.inline_files if table and req.mode == "append" else ()
                        await self.on_inline(req.org, req.super_, req.table, (*kept, data_file))
                    return result
                except _WaitedTooLong:
                    continue  # it waited too long for its turn: upload it again first
                except IdempotencyMismatch:
                    unsure = False
                    raise
                except ConflictError:
                    unsure = False
                    if req.if_match is not None:
                        raise
                    if attempt:
                        # Another process keeps winning: back off a little, at random.
                        await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                    seen = turn.commits
                    table = (await self.reader.super_state(req.org, req.super_)).tables.get(
                        req.table
                    )
                    fresh = {f.name: f.type for f in table.columns} if table else {}
                    if req.fmt == "csv" and fresh != known:
                        # CSV cells are typed by the table's schema: parse again against
                        # the schema the concurrent write left.
                        known = fresh
                        source = await anyio.to_thread.run_sync(
                            open_source, req.source, req.fmt, known
                        )
                        written = None
            current = table.version if table else NEW_TABLE
            raise ConflictError(
                f"table {req.org}/{req.super_}/{req.table} kept changing; gave up after "
                f"{self.retries} retries",
                current_version=current,
            )
        except BaseException:
            if data_file is not None and not unsure:
                with anyio.CancelScope(shield=True):
                    await self.discard(data_file)
            raise

    def _turn(self, req: IngestRequest) -> _Turn:
        key = (req.org, req.super_, req.table)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        return turn

    async def record_grace(self) -> None:
        """Before this writer's first append: gc must never use a shorter grace than
        this writer lets a file wait before re-uploading it."""
        if not self._grace_recorded:
            await record_writer_grace(self.log.client, self.log.keys, 2 * self.max_file_age_s)
            self._grace_recorded = True

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
            table, written = await _off_loop(req.source, conform_table, source, plan)
            inline = self.inline_file(table, written)
            if inline is not None:
                return written, inline
        return await self.write_file(req.org, req.super_, req.table, source, plan, progress)

    async def _earlier_result(self, req: IngestRequest) -> IngestResult | None:
        assert req.idempotency_key is not None
        stored = await self.log.stored_result(req.org, req.super_, req.idempotency_key)
        if stored is None:
            return None
        if stored.fingerprint != req.fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used for a different request"
            )
        return _replayed(stored.result, stored.version, stored.event_ids)

    @staticmethod
    def _check_if_match(req: IngestRequest, table: TableState | None) -> None:
        if req.if_match is None:
            return
        current = table.version if table else NEW_TABLE
        if current != req.if_match:
            raise ConflictError(
                f"If-Match: table is at version {current}, not {req.if_match}",
                current_version=current,
            )

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

    async def register(self, org: str, super_: str, actor: str, request_id: str) -> None:
        """Record the org and super in the registry before a table's first event (skipped
        when this process did so within the last minute)."""
        unit = (org, super_)
        if time.monotonic() - self._registered.get(unit, -1e9) <= 60:
            return
        common: dict[str, Any] = {
            "org": org,
            "super_": super_,
            "actor": actor,
            "time": now(),
            "request_id": request_id,
        }
        await self.log.ensure_super(org, super_, OrgCreated(**common), SuperCreated(**common))
        if len(self._registered) > 10_000:
            self._registered.clear()
        self._registered[unit] = time.monotonic()

    async def _append(
        self,
        req: IngestRequest,
        table: TableState | None,
        plan: Plan,
        written: WrittenFile,
        data_file: DataFile,
        token: tuple[str, str, int | None],
    ) -> IngestResult:
        base: dict[str, Any] = {
            "org": req.org,
            "super_": req.super_,
            "table": req.table,
            "actor": req.actor,
            "time": now(),
            "request_id": req.request_id,
        }
        version = table.version if table else NEW_TABLE
        events: list[EventBase] = []
        if table is None:
            version += 1
            events.append(
                TableCreated(version=version, columns=plan.columns, mirrors=self.mirrors, **base)
            )
        elif plan.schema_changed:
            version += 1
            events.append(
                SchemaEvolved(
                    version=version,
                    columns=plan.columns,
                    added=plan.added,
                    promoted=plan.promoted,
                    **base,
                )
            )
        version += 1
        if req.mode == "overwrite" and table is not None:
            events.append(
                TableOverwritten(
                    version=version,
                    files=(data_file,),
                    removed_files=tuple(f.path for f in table.files),
                    rows=written.rows,
                    rows_removed=table.row_count,
                    **base,
                )
            )
        else:
            events.append(
                RowsAppended(version=version, files=(data_file,), rows=written.rows, **base)
            )
        key, fingerprint, ttl = token
        stored = _Stored(table=req.table, rows=written.rows, mode=req.mode, file=data_file.path)
        idempotency = Idempotency(
            key=key, fingerprint=fingerprint, result=msgspec.json.encode(stored), ttl_s=ttl
        )
        appended = await self.log.append(
            req.org,
            req.super_,
            req.table,
            events,
            expected_version=table.version if table else NEW_TABLE,
            idempotency=idempotency,
        )
        if appended.replayed:
            first = msgspec.json.decode(appended.result, type=_Stored)
            if first.file != data_file.path:
                # A concurrent request with the same key won: our file is not referenced.
                await self.discard(data_file)
                return _replayed(appended.result, appended.version, appended.event_ids)
            # Else it is our own append, run twice because its reply was lost: it counts
            # once, as the first run's result.
        return IngestResult(
            table=req.table,
            version=appended.version,
            rows=written.rows,
            event_id=appended.event_ids[-1],
            mode=req.mode,
        )
