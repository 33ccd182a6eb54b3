"""The commit loop every change shares, and the shape of a change.

Each change is computed against one table version: the files it must rewrite are read
(through DuckDB, like queries read them), the rewritten rows are published as a new
file (or inlined, when tiny), and one event records the files removed and added. The
event is appended only if the table is still at that version (compare-and-set).

Fairness. In one process, the changes and appends of a table take turns (the writer's
per-table turn): a change is computed and appended under the turn, so no writer of
this process commits in between and its compare-and-set fails only to another
process. Then the change is *rebased* when it still applies unchanged (``still_valid``:
same schema, every file it rewrote still current, no file added since holding a row it
had to see), else computed again; retries back off with jitter, and after ``retries``
of them it is a 409. Compaction, which may be long, is computed outside the turn and
rebased under it. So a 409 means a real conflict (or a stale If-Match), not a writer
that was merely slower than its neighbours.

A failed or conflicting attempt deletes the files it published, except while an append's
outcome is unknown (a lost connection): then they stay, referenced or orphans for gc.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import duckdb
import msgspec
import pyarrow as pa

from app.write.append import Writer, backoff
from app.write.bodies import Plan, conform_table, table_source
from app.write.changes.keyindex import KeyIndexes, TableIndex, indexable
from app.write.request import append_token
from events.errors import ConflictError, IdempotencyMismatch, InvalidInput, Unavailable, first_line
from events.log import NEW_TABLE, Appended, Idempotency
from events.model import DataFile, DeletionVector, EventBase, Field, FileDeletes, now
from projections.catalog import TableState
from projections.query.engine import QueryEngine


@dataclass(frozen=True)
class Target:
    """The table a change is for, and who asks."""

    org: str
    super_: str
    table: str
    actor: str = "anonymous"
    request_id: str = ""
    if_match: int | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""

    def base(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "super_": self.super_,
            "table": self.table,
            "actor": self.actor,
            "time": now(),
            "request_id": self.request_id,
        }


@dataclass
class Change:
    """One computed change: the events to append (given the version it was computed
    against), the files it published, and the result to report."""

    events: Callable[[int], list[EventBase]]
    result: dict[str, Any]
    added: list[DataFile] = field(default_factory=list)
    # The files (by ``DataFile.identity``) it rewrote, and the rows it deletes in place.
    inputs: tuple[str, ...] = ()
    columns: tuple[Field, ...] = ()
    published_at: float = field(default_factory=time.monotonic)
    deletes: tuple[FileDeletes, ...] = ()
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Whether it may be rebased onto a later version (see ``still_valid``) instead of
    # computed again, and if so, whether files added since may hold rows the change
    # had to see (None: no added file matters).
    rebase: bool = False
    conflicts: Callable[[list[DataFile]], bool] | None = None
    # Filled in by the commit loop: the version it was computed against, and the
    # files of that version.
    version: int = NEW_TABLE
    seen: frozenset[str] = frozenset()


@dataclass
class _Attempt:
    """A change across its attempts, and whether its append's outcome is unknown (a
    lost connection: then its files stay, referenced or orphans for gc)."""

    change: Change | None = None
    unsure: bool = False


class Outcome(msgspec.Struct, frozen=True):
    """What a change did. ``event_id`` is None when there was nothing to change."""

    table: str
    version: int
    event_id: str | None
    result: dict[str, Any]
    replayed: bool = False


class _Stored(msgspec.Struct, frozen=True):
    """Recorded with the idempotency token: the result, and the files of the attempt
    that won (to tell our own re-run from a concurrent request with the same key)."""

    result: dict[str, Any]
    files: list[str] = []
    attempt: str = ""  # names the computed change (which may have published no file)


class ChangeLoop:
    """What every change shares: the services it uses, the commit loop (compute against
    a version, append with that version expected, compute again on a conflict), and
    the publishing of rewritten rows."""

    def __init__(
        self,
        writer: Writer,
        engine: QueryEngine,
        *,
        retries: int = 10,
        compact_small_bytes: int = 32 * 1024 * 1024,
        compact_target_bytes: int = 256 * 1024 * 1024,
        compact_min_files: int = 4,
        deletion_vectors: bool = True,
        deletion_max_ratio: float = 0.5,
        compact_deleted_ratio: float = 0.2,
        inline_flush_rows: int = 10_000,
        inline_flush_bytes: int = 4 * 1024 * 1024,
        inline_flush_files: int = 256,
        key_index_rows: int = 20_000_000,
    ) -> None:
        self.writer = writer
        self.reader = writer.reader
        self.log = writer.log
        self.engine = engine
        self.retries = retries
        self.compact_small_bytes = compact_small_bytes
        self.compact_target_bytes = compact_target_bytes
        self.compact_min_files = compact_min_files
        self.deletion_vectors = deletion_vectors
        self.deletion_max_ratio = deletion_max_ratio
        self.compact_deleted_ratio = compact_deleted_ratio
        self.inline_flush_rows = inline_flush_rows
        self.inline_flush_bytes = inline_flush_bytes
        self.inline_flush_files = inline_flush_files
        self._flushing: set[tuple[str, str, str]] = set()
        self.key_indexes = KeyIndexes(key_index_rows)

    def key_index(
        self,
        target: Target,
        columns: tuple[Field, ...],
        key: Sequence[str],
        files: Sequence[DataFile],
    ) -> TableIndex | None:
        """The table's key index for ``key``, if the key can have one (one integer
        column) and the table fits (``LEDGERLAKE_KEY_INDEX_ROWS``)."""
        if not indexable(columns, key):
            return None
        rows = sum(f.rows for f in files)
        name = (target.org, target.super_, target.table)
        return self.key_indexes.get(name, columns, key[0], rows)

    async def _commit(
        self,
        target: Target,
        prepare: Callable[[TableState | None], Awaitable[Change | None]],
        *,
        allow_new: bool = False,
        outside_turn: bool = False,
    ) -> Outcome:
        """Compute the change and append its events, taking the table's turn in this
        process (with its appends and other changes) so that no other writer here
        commits between the read and the append. ``outside_turn``: compute without the
        turn (compaction, which may be long and rebases when its inputs are current)."""
        earlier = await self._earlier_outcome(target)
        if earlier is not None:
            return earlier
        token = append_token(target.idempotency_key, target.fingerprint)
        turn = self.writer.turn(target.org, target.super_, target.table)
        attempt = _Attempt()
        try:
            for n in range(self.retries + 1):
                await backoff(n)
                if outside_turn and attempt.change is None:
                    table, _ = await self._current(target, allow_new)
                    attempt.change = await _prepared(prepare, table)
                async with turn.lock:
                    self.writer.forget(target.org, target.super_, target.table)
                    table, current = await self._current(target, allow_new)
                    if not await self._still_applies(attempt, table):
                        if outside_turn:
                            continue  # compute again, outside the turn
                        attempt.change = await _prepared(prepare, table)
                    outcome = await self._append(target, attempt, table, current, token)
                    if outcome is not None:
                        turn.commits += 1
                        return outcome
            raise await self._gave_up(target)
        except BaseException:
            if attempt.change is not None and not attempt.unsure:
                with anyio.CancelScope(shield=True):
                    await self._discard(attempt.change)
            raise

    async def _still_applies(self, attempt: _Attempt, table: TableState | None) -> bool:
        """Whether the attempt's change applies to ``table`` as it is (rebased if the
        table moved on); if not, its files are discarded."""
        change = attempt.change
        if change is None:
            return False
        if (table.version if table else NEW_TABLE) == change.version:
            return True
        if change.rebase and await anyio.to_thread.run_sync(
            still_valid, change, table, self.writer
        ):
            return True
        await self._discard(change)
        attempt.change = None
        return False

    async def _append(
        self,
        target: Target,
        attempt: _Attempt,
        table: TableState | None,
        current: int,
        token: tuple[str, str, int | None],
    ) -> Outcome | None:
        """Append the change's events at ``current``: the outcome, or None if another
        process's commit won the compare-and-set (409 with If-Match)."""
        change = attempt.change
        assert change is not None
        events = change.events(current)
        if not events and target.idempotency_key is None:
            return Outcome(target.table, current, None, change.result)
        if table is None:
            await self.writer.register(target.org, target.super_, target.actor, target.request_id)
        await self.writer.record_grace()
        key, fingerprint, ttl = token
        stored = _Stored(change.result, [f.path for f in change.added], change.token)
        idem = Idempotency(
            key=key, fingerprint=fingerprint, result=msgspec.json.encode(stored), ttl_s=ttl
        )
        try:
            attempt.unsure = True
            appended = await self.log.append(
                target.org,
                target.super_,
                target.table,
                events,
                expected_version=current,
                idempotency=idem,
            )
            attempt.unsure = False
        except ConflictError:
            attempt.unsure = False
            if target.if_match is not None:
                raise
            return None
        return await self._outcome(target, change, stored, appended)

    async def _current(self, target: Target, allow_new: bool) -> tuple[TableState | None, int]:
        """The table as it is now and its version, checked against If-Match."""
        state = await self.reader.super_state(target.org, target.super_)
        table = state.tables.get(target.table)
        if table is None and not allow_new:
            table = await self.reader.require_table(target.org, target.super_, target.table)
        current = table.version if table else NEW_TABLE
        if target.if_match is not None and target.if_match != current:
            raise ConflictError(
                f"If-Match: table is at version {current}, not {target.if_match}",
                current_version=current,
            )
        return table, current

    async def _outcome(
        self, target: Target, change: Change, stored: _Stored, appended: Appended
    ) -> Outcome:
        """What the append did: this change, or the first one of a concurrent request
        with the same key (whose files this change then discards)."""
        if appended.replayed:
            first = msgspec.json.decode(appended.result, type=_Stored)
            if (first.attempt, first.files) != (stored.attempt, stored.files):
                # A concurrent request with the same key won.
                await self._discard(change)
                return Outcome(
                    target.table,
                    appended.version,
                    appended.event_ids[-1] or None,
                    first.result,
                    True,
                )
        # No events (a change that changes nothing) only recorded the key.
        return Outcome(
            target.table, appended.version, appended.event_ids[-1] or None, change.result
        )

    async def _earlier_outcome(self, target: Target) -> Outcome | None:
        """The first outcome of a request whose Idempotency-Key was seen before."""
        if target.idempotency_key is None:
            return None
        earlier = await self.log.stored_result(target.org, target.super_, target.idempotency_key)
        if earlier is None:
            return None
        if earlier.fingerprint != target.fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used for a different request"
            )
        stored = msgspec.json.decode(earlier.result, type=_Stored)
        return Outcome(
            target.table, earlier.version, earlier.event_ids[-1] or None, stored.result, True
        )

    async def _gave_up(self, target: Target) -> ConflictError:
        """The 409 of a change whose table kept changing under every retry."""
        latest = (await self.reader.super_state(target.org, target.super_)).tables
        now_at = latest[target.table].version if target.table in latest else NEW_TABLE
        return ConflictError(
            f"table {target.org}/{target.super_}/{target.table} kept changing under "
            f"this change; gave up after {self.retries} retries",
            current_version=now_at,
        )

    async def _discard(self, change: Change) -> None:
        for data_file in change.added:
            await self.writer.discard(data_file)

    async def _output(
        self, target: Target, rows: pa.Table, columns: tuple[Field, ...], *, inline_ok: bool
    ) -> DataFile | None:
        """Publish the rows of a rewrite (or inline them when tiny); None if empty."""
        if rows.num_rows == 0:
            return None
        source = table_source(rows)
        plan = Plan(columns, (), (), {f.name: f.type for f in columns})
        if inline_ok and self.writer.inline_max_rows:
            conformed, written = await anyio.to_thread.run_sync(conform_table, source, plan)
            inline = self.writer.inline_file(conformed, written)
            if inline is not None:
                return inline
        _, data_file = await self.writer.write_file(
            target.org, target.super_, target.table, source, plan
        )
        return data_file

    def in_place(self, data_file: DataFile, more: int) -> bool:
        """Whether a change deletes ``more`` rows of ``data_file`` in place (a deletion
        vector) rather than rewriting the file: a Parquet file, while at most
        ``deletion_max_ratio`` of its rows would be deleted (inlined batches are tiny:
        rewriting them is as cheap)."""
        if not self.deletion_vectors or data_file.is_inline:
            return False
        already = data_file.deleted.count if data_file.deleted else 0
        return already + more <= self.deletion_max_ratio * data_file.rows

    def _run_sql(self, build: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run ``build`` on an internal DuckDB connection, mapping engine errors."""
        con = self.engine.connect_internal()
        try:
            return build(con)
        except (duckdb.IOException, duckdb.HTTPException) as exc:
            raise Unavailable(
                f"a data file could not be read: {first_line(exc)}", code="data_unavailable"
            ) from exc
        except (
            duckdb.ConversionException,
            duckdb.OutOfRangeException,
            duckdb.InvalidInputException,
        ) as exc:
            # Only a user's where condition or values can fail like this.
            raise InvalidInput(
                f"a value does not fit its column: {first_line(exc)}", code="invalid_where"
            ) from exc
        finally:
            con.close()

    async def after_inline_write(
        self, org: str, super_: str, table: str, inline: tuple[DataFile, ...] | None = None
    ) -> None:
        """Flush a table's inlined rows once enough have accumulated: a change that may
        inline its output calls it. Compaction (``compact.py``) implements it."""
        raise NotImplementedError


async def _prepared(
    prepare: Callable[[TableState | None], Awaitable[Change | None]], table: TableState | None
) -> Change:
    """The change ``prepare`` computes against ``table``, stamped with what it saw."""
    change = await prepare(table) or Change(lambda _: [], {})
    change.version = table.version if table else NEW_TABLE
    change.seen = frozenset(f.path for f in table.files) if table else frozenset()
    return change


def still_valid(change: Change, table: TableState | None, writer: Writer) -> bool:
    """Whether a change computed against an earlier version applies unchanged to the
    table's new version (a rebase): the schema is the same, every file it rewrote is
    still current, and no file added since holds rows it had to see. Runs in a worker
    thread (``conflicts`` may read key columns)."""
    if table is None or not change.rebase or change.columns != table.columns:
        return False
    if change.version == NEW_TABLE:
        return False  # it would create the table another writer created
    if time.monotonic() - change.published_at > writer.max_file_age_s:
        return False  # gc could take its files for orphans: compute again
    current = {f.identity for f in table.files}
    if not all(identity in current for identity in change.inputs):
        return False
    # Rows it deletes in place: still there (no one else deleted or replaced them).
    by_path = {f.path: f for f in table.files}
    for deletes in change.deletes:
        now_ = by_path.get(deletes.path)
        if now_ is None:
            return False
        if now_.deleted is not None and not set(now_.deleted.rows()).isdisjoint(
            DeletionVector(0, deletes.count, deletes.positions).rows()
        ):
            return False
    added = [f for f in table.files if f.path not in change.seen]
    return not added or change.conflicts is None or not change.conflicts(added)
