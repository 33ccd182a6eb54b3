"""The write path: validate, write the Parquet file, append the events.

Order matters (see docs/design.md): the data file is published *before* the event that
references it is appended, and a write is acknowledged only once that append returned.
If anything fails in between, the file is deleted (or, if the process dies, stays an
orphan no event references, invisible to every reader).
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import msgspec

from app.write.bodies import Plan, Source, WrittenFile, open_source, plan_schema
from app.write.files import DataFileWriter, off_loop
from app.write.request import (
    MODES,
    IngestRequest,
    IngestResult,
    StoredIngest,
    append_token,
    check_name,
    replayed_result,
)
from events.errors import ConflictError, IdempotencyMismatch, InvalidInput
from events.log import NEW_TABLE, Idempotency
from events.model import (
    DataFile,
    DataType,
    Event,
    EventBase,
    OrgCreated,
    RowsAppended,
    SchemaEvolved,
    SuperCreated,
    TableCreated,
    TableOverwritten,
    now,
)
from events.redis_log import RedisEventLog, record_writer_grace
from events.storage.port import Storage
from projections.catalog import TableState, apply_table
from projections.reader import CatalogReader

log = logging.getLogger("ledgerlake.writes")


T = TypeVar("T")
# Tables whose state after this process's own last append is kept (see Writer._known).
KNOWN_TABLES = 4096


async def backoff(attempt: int) -> None:
    """Wait a little, at random, before retry ``attempt`` (0: none) after another
    process's commit won the compare-and-set: exponential, capped at 50 ms, full jitter,
    so that writers of other processes that collided do not collide again in step."""
    if attempt:
        await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


class _WaitedTooLong(Exception):
    """A staged file waited for its table's turn past ``max_file_age_s``."""


class _Turn:
    """The commit turn of one table among this process's writers, and how many commits
    they made (a writer that read the table before the last one must read again)."""

    __slots__ = ("__weakref__", "commits", "lock")

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.commits = 0


@dataclass
class _Attempt:
    """One ingest's state across its retries: the table as last read, the parsed body,
    and the file published for it."""

    table: TableState | None
    known: dict[str, DataType]
    source: Source
    seen: int  # the turn's commit count when the table was read
    written: WrittenFile | None = None
    data_file: DataFile | None = None
    published_at: float = 0.0
    # True while an append is in flight: if it fails then (a lost connection), the
    # event may or may not be in the log, so the file must stay (an orphan at worst).
    unsure: bool = False

    def too_old(self, max_age_s: float) -> bool:
        return time.monotonic() - self.published_at > max_age_s


def schema_events(
    table: TableState | None,
    plan: Plan,
    version: int,
    mirrors: tuple[str, ...],
    base: dict[str, Any],
) -> list[EventBase]:
    """What a write's rows need first, a version each after ``version``: the table's
    creation (with the mirror formats it gets), or its schema change, or nothing."""
    if table is None:
        return [TableCreated(version=version + 1, columns=plan.columns, mirrors=mirrors, **base)]
    if plan.schema_changed:
        return [
            SchemaEvolved(
                version=version + 1,
                columns=plan.columns,
                added=plan.added,
                promoted=plan.promoted,
                **base,
            )
        ]
    return []


class Writer(DataFileWriter):
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
        # Each table's state right after this process's last append to it: the next
        # append starts from it instead of reading the log's tail (a round trip). If
        # anyone else changed the table since, the append's compare-and-set on the
        # table's version fails and the writer reads the tail then, as after any
        # conflict: a table's state is a function of its own events, and its version
        # moves with each of them. Forgotten when a change of this process commits to
        # the table, and on any failed or uncertain append.
        self._known: OrderedDict[tuple[str, str, str], TableState] = OrderedDict()

    def forget(self, org: str, super_: str, table: str) -> None:
        """Drop what this writer knows of the table (a change is committing to it)."""
        self._known.pop((org, super_, table), None)

    async def _table(self, req: IngestRequest) -> TableState | None:
        """The table as this process last left it, or else as the log says now (an
        If-Match is always checked against the log)."""
        key = (req.org, req.super_, req.table)
        known = self._known.get(key) if req.if_match is None else None
        if known is not None:
            self._known.move_to_end(key)
            return known
        return (await self.reader.super_state(req.org, req.super_)).tables.get(req.table)

    def _remember(self, key: tuple[str, str, str], state: TableState | None) -> None:
        if state is None:
            self._known.pop(key, None)
            return
        self._known[key] = state
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_TABLES:
            self._known.popitem(last=False)

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
        table = await self._table(req)
        self._check_if_match(req, table)
        known = {f.name: f.type for f in table.columns} if table else {}
        source = await off_loop(req.source, open_source, req.source, req.fmt, known)
        at = _Attempt(table, known, source, seen)
        registered = False
        token = append_token(req.idempotency_key, req.fingerprint)
        try:
            for attempt in range(self.retries + 1):
                plan = plan_schema(
                    at.table.columns if at.table else None, at.source.fields, text=at.source.text
                )
                await self._ensure_file(req, at, plan, progress)
                if not registered:
                    await self.register(req.org, req.super_, req.actor, req.request_id)
                registered = True
                await self.record_grace()
                if at.too_old(self.max_file_age_s):
                    continue  # it waited too long (slow registry?): upload it again first
                try:
                    result = await self._commit_in_turn(req, turn, at, plan, token)
                except _WaitedTooLong:
                    continue  # it waited too long for its turn: upload it again first
                except IdempotencyMismatch:
                    at.unsure = False
                    raise
                except ConflictError:
                    at.unsure = False
                    if req.if_match is not None:
                        raise
                    await self._after_conflict(req, turn, at, attempt)
                    continue
                inline = at.data_file is not None and at.data_file.is_inline
                if inline and self.on_inline is not None and not result.replayed:
                    assert at.data_file is not None
                    kept = at.table.inline_files if at.table and req.mode == "append" else ()
                    await self.on_inline(req.org, req.super_, req.table, (*kept, at.data_file))
                return result
            current = at.table.version if at.table else NEW_TABLE
            raise ConflictError(
                f"table {req.org}/{req.super_}/{req.table} kept changing; gave up after "
                f"{self.retries} retries",
                current_version=current,
            )
        except BaseException:
            if at.data_file is not None and not at.unsure:
                with anyio.CancelScope(shield=True):
                    await self.discard(at.data_file)
            raise

    async def _ensure_file(
        self,
        req: IngestRequest,
        at: _Attempt,
        plan: Plan,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Publish the attempt's file, or again when it no longer fits the plan."""
        # A file that waited too long for its append could be taken for an orphan by
        # `ledgerlake gc`: upload it again instead.
        stale = at.too_old(self.max_file_age_s)
        if at.written is None or at.written.targets != plan.targets or stale:
            # First try, or a concurrent writer changed the types this file must have:
            # (re)write it against the current schema.
            if at.data_file is not None:
                await self.discard(at.data_file)
                at.data_file = None
            at.written, at.data_file = await self._materialize(req, at.source, plan, progress)
            at.published_at = time.monotonic()

    async def _commit_in_turn(
        self,
        req: IngestRequest,
        turn: _Turn,
        at: _Attempt,
        plan: Plan,
        token: tuple[str, str, int | None],
    ) -> IngestResult:
        """Append under the table's turn, first folding in what other writers of this
        process committed since the attempt read the table."""
        assert at.written is not None and at.data_file is not None
        async with turn.lock:
            if at.too_old(self.max_file_age_s):
                raise _WaitedTooLong
            if turn.commits != at.seen and req.if_match is None:
                at.seen = turn.commits
                now_ = await self._table(req)
                if now_ is None or at.table is None or now_.columns != at.table.columns:
                    raise ConflictError("the schema moved", current_version=-1)
                at.table = now_
            at.unsure = True
            result = await self._append(req, at.table, plan, at.written, at.data_file, token)
            at.unsure = False
            turn.commits += 1
        return result

    async def _after_conflict(
        self, req: IngestRequest, turn: _Turn, at: _Attempt, attempt: int
    ) -> None:
        """Read the table again after another process's commit won."""
        self.forget(req.org, req.super_, req.table)
        await backoff(attempt)
        at.seen = turn.commits
        at.table = (await self.reader.super_state(req.org, req.super_)).tables.get(req.table)
        fresh = {f.name: f.type for f in at.table.columns} if at.table else {}
        if req.fmt == "csv" and fresh != at.known:
            # CSV cells are typed by the table's schema: parse again against the schema
            # the concurrent write left.
            at.known = fresh
            at.source = await anyio.to_thread.run_sync(open_source, req.source, req.fmt, fresh)
            at.written = None

    def _turn(self, req: IngestRequest) -> _Turn:
        return self.turn(req.org, req.super_, req.table)

    def turn(self, org: str, super_: str, table: str) -> _Turn:
        """The commit turn of one table in this process, which appends and changes of
        that table take (``async with turn.lock``), counting commits as they make them."""
        key = (org, super_, table)
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

    async def _earlier_result(self, req: IngestRequest) -> IngestResult | None:
        assert req.idempotency_key is not None
        stored = await self.log.stored_result(req.org, req.super_, req.idempotency_key)
        if stored is None:
            return None
        if stored.fingerprint != req.fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used for a different request"
            )
        return replayed_result(stored.result, stored.version, stored.event_ids)

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

    def _events(
        self,
        req: IngestRequest,
        table: TableState | None,
        plan: Plan,
        written: WrittenFile,
        data_file: DataFile,
    ) -> list[EventBase]:
        """The events of a write: the table's creation or schema change, if any, then
        its rows appended (or the table overwritten)."""
        base: dict[str, Any] = {
            "org": req.org,
            "super_": req.super_,
            "table": req.table,
            "actor": req.actor,
            "time": now(),
            "request_id": req.request_id,
        }
        version = table.version if table else NEW_TABLE
        events = schema_events(table, plan, version, self.mirrors, base)
        version += len(events)
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
        return events

    async def _append(
        self,
        req: IngestRequest,
        table: TableState | None,
        plan: Plan,
        written: WrittenFile,
        data_file: DataFile,
        token: tuple[str, str, int | None],
    ) -> IngestResult:
        events = self._events(req, table, plan, written, data_file)
        key, fingerprint, ttl = token
        stored = StoredIngest(
            table=req.table, rows=written.rows, mode=req.mode, file=data_file.path
        )
        idempotency = Idempotency(
            key=key, fingerprint=fingerprint, result=msgspec.json.encode(stored), ttl_s=ttl
        )
        table_key = (req.org, req.super_, req.table)
        self.forget(*table_key)
        appended = await self.log.append(
            req.org,
            req.super_,
            req.table,
            events,
            expected_version=table.version if table else NEW_TABLE,
            idempotency=idempotency,
        )
        if not appended.replayed and appended.version == events[-1].version:
            # (A new table that continues a dropped one's versions is read next time.)
            state = table
            for event, event_id in zip(events, appended.event_ids, strict=True):
                state = apply_table(cast(Event, msgspec.structs.replace(event, id=event_id)), state)
            self._remember(table_key, state)
        if appended.replayed:
            first = msgspec.json.decode(appended.result, type=StoredIngest)
            if first.file != data_file.path:
                # A concurrent request with the same key won: our file is not referenced.
                await self.discard(data_file)
                return replayed_result(appended.result, appended.version, appended.event_ids)
            # Else it is our own append, run twice because its reply was lost: it counts
            # once, as the first run's result.
        return IngestResult(
            table=req.table,
            version=appended.version,
            rows=written.rows,
            event_id=appended.event_ids[-1],
            mode=req.mode,
        )
