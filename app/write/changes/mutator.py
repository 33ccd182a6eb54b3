"""Copy-on-write changes to a table: upsert, delete, compaction, restore and expiry.

Each change is computed against one table version: the files it must rewrite are read
(through DuckDB, like queries read them), the rewritten rows are published as a new
file (or inlined, when tiny), and one event records the files removed and added. The
event is appended only if the table is still at that version; if it moved on, the
change is computed again against the new version (up to ``retries`` times, then 409),
so no concurrent update is ever lost. Compaction alone may *rebase* without recomputing:
its output is still right if every file it merged is still current.

A failed or conflicting attempt deletes the files it published, except while an append's
outcome is unknown (a lost connection): then they stay, referenced or orphans for gc.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import anyio
import duckdb
import msgspec
import pyarrow as pa

from app.write.append import Writer, append_token
from app.write.bodies import Plan, Source, WrittenFile, conform_table, plan_schema, table_source
from events.errors import (
    ConflictError,
    IdempotencyMismatch,
    InvalidInput,
    TypeMismatch,
    Unavailable,
)
from events.log import NEW_TABLE, Idempotency
from events.model import (
    DataFile,
    DataType,
    EventBase,
    Field,
    MirrorsChanged,
    PoliciesSet,
    Policy,
    RowsDeleted,
    RowsUpserted,
    SchemaEvolved,
    TableCompacted,
    TableCreated,
    TableDropped,
    TableRestored,
    VersionsExpired,
    now,
)
from projections.arrow import conform, normalize_array, quote_ident, to_arrow, type_name
from projections.catalog import TableState
from projections.query.engine import QueryEngine
from projections.query.predicate import check_predicate
from projections.query.views import conform_to, ordered_files_sql

log = logging.getLogger("ledgerlake.mutations")

KEY_KINDS = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "decimal", "string", "binary", "date", "time", "timestamp",
})  # fmt: skip
_ORDERABLE = KEY_KINDS - {"bool", "binary"}


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
    inputs: tuple[str, ...] = ()
    columns: tuple[Field, ...] = ()
    published_at: float = field(default_factory=time.monotonic)


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


class Mutator:
    """Upserts, deletes, compaction, restore and expiry of tables."""

    def __init__(
        self,
        writer: Writer,
        engine: QueryEngine,
        *,
        retries: int = 10,
        compact_small_bytes: int = 32 * 1024 * 1024,
        compact_target_bytes: int = 256 * 1024 * 1024,
        compact_min_files: int = 4,
        inline_flush_rows: int = 10_000,
        inline_flush_bytes: int = 4 * 1024 * 1024,
        inline_flush_files: int = 256,
    ) -> None:
        self.writer = writer
        self.reader = writer.reader
        self.log = writer.log
        self.engine = engine
        self.retries = retries
        self.compact_small_bytes = compact_small_bytes
        self.compact_target_bytes = compact_target_bytes
        self.compact_min_files = compact_min_files
        self.inline_flush_rows = inline_flush_rows
        self.inline_flush_bytes = inline_flush_bytes
        self.inline_flush_files = inline_flush_files
        self._flushing: set[tuple[str, str, str]] = set()

    # -- the commit loop ---------------------------------------------------------------

    async def _commit(
        self,
        target: Target,
        prepare: Callable[[TableState | None], Awaitable[Change | None]],
        *,
        allow_new: bool = False,
        rebase: bool = False,
    ) -> Outcome:
        if target.idempotency_key is not None:
            earlier = await self.log.stored_result(
                target.org, target.super_, target.idempotency_key
            )
            if earlier is not None:
                if earlier.fingerprint != target.fingerprint:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was already used for a different request"
                    )
                stored = msgspec.json.decode(earlier.result, type=_Stored)
                return Outcome(
                    target.table,
                    earlier.version,
                    earlier.event_ids[-1] or None,
                    stored.result,
                    True,
                )
        key, fingerprint, ttl = append_token(target.idempotency_key, target.fingerprint)
        change: Change | None = None
        unsure = False
        try:
            for _attempt in range(self.retries + 1):
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
                if change is None or not (rebase and _still_valid(change, table, self.writer)):
                    if change is not None:
                        await self._discard(change)
                        change = None
                    change = await prepare(table) or Change(lambda _: [], {})
                events = change.events(current)
                if not events and target.idempotency_key is None:
                    return Outcome(target.table, current, None, change.result)
                if table is None:
                    await self.writer.register(
                        target.org, target.super_, target.actor, target.request_id
                    )
                await self.writer.record_grace()
                stored = _Stored(change.result, [f.path for f in change.added])
                idem = Idempotency(
                    key=key,
                    fingerprint=fingerprint,
                    result=msgspec.json.encode(stored),
                    ttl_s=ttl,
                )
                try:
                    unsure = True
                    appended = await self.log.append(
                        target.org,
                        target.super_,
                        target.table,
                        events,
                        expected_version=current,
                        idempotency=idem,
                    )
                    unsure = False
                except ConflictError:
                    unsure = False
                    if target.if_match is not None:
                        raise
                    continue
                if appended.replayed:
                    first = msgspec.json.decode(appended.result, type=_Stored)
                    if first.files != stored.files:
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
            latest = (await self.reader.super_state(target.org, target.super_)).tables
            now_at = latest[target.table].version if target.table in latest else NEW_TABLE
            raise ConflictError(
                f"table {target.org}/{target.super_}/{target.table} kept changing under "
                f"this change; gave up after {self.retries} retries",
                current_version=now_at,
            )
        except BaseException:
            if change is not None and not unsure:
                with anyio.CancelScope(shield=True):
                    await self._discard(change)
            raise

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

    def _run_sql(self, build: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run ``build`` on an internal DuckDB connection, mapping engine errors."""
        con = self.engine.connect_internal()
        try:
            return build(con)
        except (duckdb.IOException, duckdb.HTTPException) as exc:
            raise Unavailable(
                f"a data file could not be read: {_first_line(exc)}", code="data_unavailable"
            ) from exc
        except (
            duckdb.ConversionException,
            duckdb.OutOfRangeException,
            duckdb.InvalidInputException,
        ) as exc:
            # Only a user's where condition or values can fail like this.
            raise InvalidInput(
                f"a value does not fit its column: {_first_line(exc)}", code="invalid_where"
            ) from exc
        finally:
            con.close()

    # -- upsert ------------------------------------------------------------------------

    async def upsert(
        self,
        target: Target,
        source: Source,
        key: Sequence[str],
        newer_than: str | None = None,
    ) -> Outcome:
        """Merge ``source`` by ``key``: replace stored rows whose key matches an incoming
        row, insert the rest. In-batch duplicates: the last occurrence wins, or the one
        with the greatest ``newer_than``; with ``newer_than``, an incoming row that is not
        newer than the stored row of its key is skipped (``unchanged``)."""
        key = _check_key_list(key)

        async def prepare(table: TableState | None) -> Change | None:
            plan = plan_schema(table.columns if table else None, source.fields, text=source.text)
            _check_upsert_columns(plan, source, key, newer_than)
            incoming, _ = await anyio.to_thread.run_sync(conform_table, source, plan)
            for name in key:
                if incoming.column(name).null_count:
                    raise InvalidInput(
                        f"key column {name!r} has a null in the body", code="null_key"
                    )
            columns = plan.columns
            files = _candidates(table.files if table else (), columns, incoming, key)
            merged = await anyio.to_thread.run_sync(
                lambda: self._run_sql(
                    lambda con: _merge(
                        con, columns, files, incoming, key, newer_than, self.engine.resolve_path
                    )
                )
            )
            out_rows, counts, touched = merged
            if counts["inserted"] + counts["updated"] == 0:
                return Change(lambda _: [], {**counts, "key": list(key), "newer_than": newer_than})
            out = await self._output(target, out_rows, columns, inline_ok=True)
            added = [out] if out else []
            removed = tuple(files[i].path for i in touched)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                out_events: list[EventBase] = []
                if table is None:
                    version += 1
                    out_events.append(
                        TableCreated(
                            version=version,
                            columns=columns,
                            mirrors=self.writer.mirrors,
                            **base,
                        )
                    )
                elif plan.schema_changed:
                    version += 1
                    out_events.append(
                        SchemaEvolved(
                            version=version,
                            columns=columns,
                            added=plan.added,
                            promoted=plan.promoted,
                            **base,
                        )
                    )
                out_events.append(
                    RowsUpserted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=removed,
                        key=tuple(key),
                        newer_than=newer_than,
                        **counts,
                        **base,
                    )
                )
                return out_events

            result = {**counts, "key": list(key), "newer_than": newer_than}
            return Change(events, result, added, removed, columns)

        outcome = await self._commit(target, prepare, allow_new=True)
        if outcome.event_id is None:
            return outcome  # every incoming row matched an identical or newer stored row
        await self.after_inline_write(target.org, target.super_, target.table)
        return outcome

    # -- delete ------------------------------------------------------------------------

    async def delete(
        self,
        target: Target,
        *,
        keys: dict[str, list[Any]] | None = None,
        where: str | None = None,
    ) -> Outcome:
        """Remove the rows whose key is listed in ``keys`` or that match ``where``."""
        if (keys is None) == (where is None):
            raise InvalidInput(
                "give exactly one of 'keys' (column -> list of values) or 'where' "
                "(a SQL boolean expression)",
                code="invalid_delete",
            )

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            if where is not None:
                condition = check_predicate(where, table.columns)
                files = list(table.files)
                key_rows = None
            else:
                assert keys is not None
                key_rows = _key_table(keys, table.columns)
                files = _candidates(table.files, table.columns, key_rows, key_rows.column_names)
                condition = " AND ".join(
                    f"__k.{quote_ident(c)} = __s.{quote_ident(c)}" for c in key_rows.column_names
                )
            out_rows, removed_rows, touched = await anyio.to_thread.run_sync(
                lambda: self._run_sql(
                    lambda con: _delete(
                        con, table.columns, files, condition, key_rows, self.engine.resolve_path
                    )
                )
            )
            if removed_rows == 0:
                return Change(lambda _: [], {"rows_removed": 0})
            out = await self._output(target, out_rows, table.columns, inline_ok=True)
            added = [out] if out else []
            removed = tuple(files[i].path for i in touched)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                return [
                    RowsDeleted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=removed,
                        rows_removed=removed_rows,
                        where=condition if where is not None else None,
                        keys=keys,
                        **base,
                    )
                ]

            return Change(events, {"rows_removed": removed_rows}, added, removed, table.columns)

        return await self._commit(target, prepare)

    # -- compaction --------------------------------------------------------------------

    async def compact(self, target: Target, *, inline_only: bool = False) -> Outcome:
        """Merge small files and every inlined batch into Parquet files of up to the
        target size. The rows are unchanged (values and types, exactly), and the merged
        rows keep the order a scan of the inputs returned; where the merged file lands
        among the others may change the order of an unordered scan (as in any SQL
        table, only ORDER BY defines one)."""

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            groups = self._compaction_groups(table, inline_only=inline_only)
            if not groups:
                return None
            added: list[DataFile] = []
            inputs: list[str] = []
            try:
                for group in groups:
                    rows = await anyio.to_thread.run_sync(self._read_group, table.columns, group)
                    out = await self._output(target, rows, table.columns, inline_ok=False)
                    if out is not None:
                        added.append(out)
                    inputs.extend(f.path for f in group)
            except BaseException:
                for data_file in added:
                    await self.writer.discard(data_file)
                raise
            total = sum(f.rows for g in groups for f in g)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                return [
                    TableCompacted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=tuple(inputs),
                        rows=total,
                        **base,
                    )
                ]

            result = {"files_removed": len(inputs), "files_added": len(added), "rows": total}
            return Change(events, result, added, tuple(inputs), table.columns)

        return await self._commit(target, prepare, rebase=True)

    def _read_group(self, columns: tuple[Field, ...], files: list[DataFile]) -> pa.Table:
        return self._run_sql(
            lambda con: _read_ordered(con, columns, files, self.engine.resolve_path)
        )

    def _compaction_groups(self, table: TableState, *, inline_only: bool) -> list[list[DataFile]]:
        """Bins of inputs to merge, each up to the target size. Inlined batches always
        go; small Parquet files go once there are at least ``compact_min_files``."""
        inline = [f for f in table.files if f.is_inline]
        small = [
            f for f in table.files if not f.is_inline and f.size_bytes < self.compact_small_bytes
        ]
        if inline_only or (len(small) < self.compact_min_files):
            small = []
        if not inline and len(small) < 2:
            return []
        groups: list[list[DataFile]] = [[]]
        size = 0
        # In the order a scan of the table reads them: Parquet files, then inlined rows.
        for f in small + inline:
            if groups[-1] and size + f.size_bytes > self.compact_target_bytes:
                groups.append([])
                size = 0
            groups[-1].append(f)
            size += f.size_bytes
        # A lone Parquet file is already as compact as it gets.
        return [g for g in groups if len(g) > 1 or g[0].is_inline]

    def needs_flush(self, inline: tuple[DataFile, ...]) -> bool:
        return (
            sum(f.rows for f in inline) >= self.inline_flush_rows
            or sum(f.size_bytes for f in inline) >= self.inline_flush_bytes
            or len(inline) >= self.inline_flush_files
        )

    async def after_inline_write(
        self, org: str, super_: str, table: str, inline: tuple[DataFile, ...] | None = None
    ) -> None:
        """Flush a table's inlined rows into Parquet once enough have accumulated.
        ``inline``: its inlined batches after the write, if the caller knows them (else
        they are read). Runs after the write was acknowledged in the log; a failure is
        only logged (the next write or compaction tries again)."""
        unit = (org, super_, table)
        if unit in self._flushing:
            return  # this process is flushing it already
        if inline is None:
            state = (await self.reader.super_state(org, super_)).tables.get(table)
            inline = state.inline_files if state else ()
        if not self.needs_flush(inline):
            return
        self._flushing.add(unit)
        try:
            await self.compact(Target(org, super_, table, actor="ledgerlake"), inline_only=True)
        except Exception:
            log.exception("flushing the inlined rows of %s/%s/%s failed", org, super_, table)
        finally:
            self._flushing.discard(unit)

    # -- restore and expiry ------------------------------------------------------------

    async def restore(self, target: Target, version: int) -> Outcome:
        """Make ``version`` (schema and files) current again, as a new version."""

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            old = await self.reader.table_at(
                target.org, target.super_, target.table, version=version
            )
            current = {f.path for f in table.files}
            wanted = {f.path for f in old.files}
            added = tuple(f for f in old.files if f.path not in current)
            removed = tuple(f.path for f in table.files if f.path not in wanted)
            base = target.base()

            def events(at: int) -> list[EventBase]:
                return [
                    TableRestored(
                        version=at + 1,
                        restored_version=version,
                        columns=old.columns,
                        files=added,
                        removed_files=removed,
                        rows=old.row_count,
                        rows_removed=table.row_count,
                        **base,
                    )
                ]

            # The restored files belong to a retained version: never ours to delete.
            return Change(events, {"restored_version": version}, [], (), old.columns)

        return await self._commit(target, prepare)

    async def drop(self, target: Target) -> Outcome:
        """Drop the table: its name becomes free, its files garbage, its mirrors go."""

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            base = target.base()

            def events(at: int) -> list[EventBase]:
                return [TableDropped(version=at + 1, rows=table.row_count, **base)]

            return Change(events, {"rows": table.row_count})

        return await self._commit(target, prepare)

    async def set_mirrors(self, target: Target, formats: tuple[str, ...]) -> Outcome:
        """Choose the mirror formats that publish the table (a no-op if unchanged)."""
        formats = tuple(sorted(set(formats)))

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            result = {"mirrors": list(formats)}
            # (A table from before mirrors existed follows the setting: record it.)
            if table.mirrors is not None and tuple(sorted(table.mirrors)) == formats:
                return Change(lambda _: [], result)
            base = target.base()

            def events(at: int) -> list[EventBase]:
                return [MirrorsChanged(version=at + 1, formats=formats, **base)]

            return Change(events, result)

        return await self._commit(target, prepare)

    async def set_policies(
        self, target: Target, policies: tuple[Policy, ...], custom_roles: tuple[str, ...] = ()
    ) -> Outcome:
        """Replace the table's row filters and column masks (validated against its
        schema); a no-op if unchanged."""
        from app.access.policies import check_policies

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            check_policies(policies, table.columns, custom_roles)
            result = {"policies": [msgspec.to_builtins(p) for p in policies]}
            if table.policies == policies:
                return Change(lambda _: [], result)
            base = target.base()

            def events(at: int) -> list[EventBase]:
                return [PoliciesSet(version=at + 1, policies=policies, **base)]

            return Change(events, result)

        return await self._commit(target, prepare)

    async def expire(self, target: Target, older_than: datetime) -> Outcome:
        """Expire the versions that stopped being current before ``older_than``: the
        version current at that instant stays, and every later one."""

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            times = await self.reader.version_times(target.org, target.super_, target.table)
            keep = max((v for v, t in times if t <= older_than), default=None)
            if keep is None or keep <= table.retained_from:
                return None
            base = target.base()

            def events(at: int) -> list[EventBase]:
                return [VersionsExpired(version=at + 1, before=keep, older_than=older_than, **base)]

            return Change(events, {"retained_from": keep}, [], (), table.columns)

        return await self._commit(target, prepare)


# -- helpers (pure, or running on a DuckDB connection in a worker thread) ---------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _still_valid(change: Change, table: TableState | None, writer: Writer) -> bool:
    """Whether a computed compaction still applies to the table's new version."""
    if table is None or change.columns != table.columns:
        return False
    if time.monotonic() - change.published_at > writer.max_file_age_s:
        return False  # gc could take its files for orphans: compute again
    current = {f.path for f in table.files}
    return all(path in current for path in change.inputs)


def _check_key_list(key: Sequence[str]) -> list[str]:
    names = [k.strip() for k in key if k.strip()]
    if not names:
        raise InvalidInput("an upsert needs key=<column>[,<column>...]", code="invalid_key")
    if len({n.lower() for n in names}) != len(names):
        raise InvalidInput("a key column is listed twice", code="invalid_key")
    return names


def _check_key_column(name: str, t: DataType, what: str = "key") -> None:
    kinds = KEY_KINDS if what == "key" else _ORDERABLE
    if t.kind not in kinds:
        raise InvalidInput(
            f"column {name!r} has type {type_name(t)}, which cannot be a {what} column",
            code="invalid_key",
        )


def _check_upsert_columns(
    plan: Plan, source: Source, key: list[str], newer_than: str | None
) -> None:
    types = {f.name: f.type for f in plan.columns}
    incoming = {f.name for f in source.fields}
    for name in key:
        if name not in types:
            raise InvalidInput(f"the key column {name!r} does not exist", code="invalid_key")
        if name not in incoming:
            raise InvalidInput(f"the body has no key column {name!r}", code="missing_key_column")
        _check_key_column(name, types[name])
    if newer_than is not None:
        if newer_than not in types or newer_than not in incoming:
            raise InvalidInput(
                f"newer_than names column {newer_than!r}, which the body does not have",
                code="invalid_newer_than",
            )
        _check_key_column(newer_than, types[newer_than], "newer_than")


def _key_table(keys: dict[str, list[Any]], columns: tuple[Field, ...]) -> pa.Table:
    """The JSON key lists of a delete, typed as the table's key columns."""
    if not isinstance(keys, dict) or not keys:
        raise InvalidInput("'keys' must map column names to lists of values", code="invalid_key")
    types = {f.name: f.type for f in columns}
    lengths = {len(v) if isinstance(v, list) else -1 for v in keys.values()}
    if -1 in lengths or len(lengths) != 1 or 0 in lengths:
        raise InvalidInput(
            "every 'keys' entry must be a non-empty list, all of the same length",
            code="invalid_key",
        )
    arrays = {}
    for name, values in keys.items():
        if name not in types:
            raise InvalidInput(f"the table has no column {name!r}", code="invalid_key")
        _check_key_column(name, types[name])
        if any(v is None for v in values):
            raise InvalidInput(f"key column {name!r} lists a null", code="null_key")
        try:
            raw = pa.chunked_array([pa.array(values)])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise TypeMismatch(
                f"the values of key column {name!r} cannot share one type ({exc})",
                code="mixed_types",
                column=name,
            ) from exc
        arrays[name] = conform(normalize_array(raw, name), types[name], name, text=True)
    return pa.table(arrays)


def _comparable(t: DataType, value: Any) -> Any:
    """A stats value (JSON) or a Python value as something that orders correctly."""
    if isinstance(value, str) and t.kind == "decimal":
        return Decimal(value)
    if isinstance(value, str) and t.kind == "timestamp":
        return datetime.fromisoformat(value)
    if isinstance(value, str) and t.kind == "date":
        return date.fromisoformat(value)
    if isinstance(value, str) and t.kind == "time":
        return dtime.fromisoformat(value)
    return value


def _candidates(
    files: Sequence[DataFile],
    columns: tuple[Field, ...],
    incoming: pa.Table,
    key: Sequence[str],
) -> list[DataFile]:
    """The files that may hold one of the incoming keys, by their min/max statistics:
    a file is skipped when, for some key column, no incoming value falls in its range
    (or the column is all null in it: a null key never matches)."""
    types = {f.name: f.type for f in columns}
    values: dict[str, list[Any]] = {}
    for name in key:
        if types[name].kind in _ORDERABLE:
            raw = incoming.column(name).to_pylist()
            values[name] = sorted(_comparable(types[name], v) for v in raw if v is not None)
    out = []
    for f in files:
        if any(_prunes(f, name, types[name], vals) for name, vals in values.items()):
            continue
        out.append(f)
    return out


def _prunes(f: DataFile, name: str, t: DataType, sorted_values: list[Any]) -> bool:
    stats = f.columns.get(name)
    if stats is None or stats.null_count >= f.rows:
        return True  # the column is absent or all null in this file
    if stats.min is None or stats.max is None:
        return False
    lo, hi = _comparable(t, stats.min), _comparable(t, stats.max)
    i = bisect.bisect_left(sorted_values, lo)
    return i == len(sorted_values) or sorted_values[i] > hi


def _col_list(columns: Sequence[Field], prefix: str = "") -> str:
    return ", ".join(prefix + quote_ident(f.name) for f in columns)


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, columns: Sequence[Field]) -> pa.Table:
    """A result as an Arrow table of exactly the table's column types."""
    table = con.execute(sql).to_arrow_table()
    arrays = []
    for i, f in enumerate(columns):
        column = table.column(i)
        target = to_arrow(f.type)
        if column.type != target:
            column = (
                pa.chunked_array([pa.nulls(len(column), target)], target)
                if f.type.kind == "null" or column.null_count == len(column)
                else column.cast(target)
            )
        arrays.append(column)
    return pa.Table.from_arrays(arrays, names=[f.name for f in columns])


def _merge(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    incoming: pa.Table,
    key: list[str],
    newer_than: str | None,
    resolve_path: Callable[[str], str],
) -> tuple[pa.Table, dict[str, int], list[int]]:
    """The upsert on candidate ``files``: (rows to write, counts, indexes of the files to
    rewrite). Rows written: the kept rows of each rewritten file, in order, then the
    applied incoming rows, in order."""
    rows = conform_to(incoming, columns)
    rows = rows.append_column("__o", pa.array(range(rows.num_rows), pa.int64()))
    con.register("__incoming", rows)
    keys = ", ".join(quote_ident(k) for k in key)
    order = (f"{quote_ident(newer_than)} DESC NULLS LAST, " if newer_than else "") + "__o DESC"
    con.execute(
        f"CREATE TEMP TABLE __i AS SELECT * FROM __incoming "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1"
    )
    con.execute(f"CREATE TEMP TABLE __s AS {ordered_files_sql(con, columns, files, resolve_path)}")
    on = " AND ".join(f"__s.{quote_ident(k)} = __i.{quote_ident(k)}" for k in key)
    same = " AND ".join(
        f"__s.{quote_ident(f.name)} IS NOT DISTINCT FROM __i.{quote_ident(f.name)}" for f in columns
    )
    newest = f"max(__s.{quote_ident(newer_than)})" if newer_than else "NULL"
    con.execute(
        f"CREATE TEMP TABLE __m AS SELECT __i.__o, count(__s.__f) AS n, "
        f"bool_and({same}) AS same, {newest} AS newest "
        f"FROM __i LEFT JOIN __s ON {on} GROUP BY __i.__o"
    )
    if newer_than:
        incoming_nt = f"__i.{quote_ident(newer_than)}"
        not_newer = (
            f"({incoming_nt} IS NULL OR (__m.newest IS NOT NULL AND {incoming_nt} <= __m.newest))"
        )
    else:
        not_newer = "false"
    con.execute(
        f"CREATE TEMP TABLE __d AS SELECT __i.__o, CASE WHEN __m.n = 0 THEN 'insert' "
        f"WHEN {not_newer} OR (__m.n = 1 AND __m.same) THEN 'keep' ELSE 'update' END AS what "
        f"FROM __i JOIN __m USING (__o)"
    )
    counts_row = con.execute(
        "SELECT count(*) FILTER (what = 'insert'), count(*) FILTER (what = 'update'), "
        "count(*) FILTER (what = 'keep') FROM __d"
    ).fetchone()
    assert counts_row is not None
    inserted, updated, unchanged = (int(x) for x in counts_row)
    # Stored rows replaced: every stored row whose key an applied update carries.
    replaced = f"EXISTS (SELECT 1 FROM __i JOIN __d USING (__o) WHERE __d.what = 'update' AND {on})"
    con.execute(f"CREATE TEMP TABLE __r AS SELECT __f, {replaced} AS gone FROM __s")
    removed_rows = con.execute("SELECT count(*) FROM __r WHERE gone").fetchone()
    touched = [
        int(r[0])
        for r in con.execute("SELECT DISTINCT __f FROM __r WHERE gone ORDER BY __f").fetchall()
    ]
    con.execute("DROP TABLE __r")
    out_sql = (
        f"SELECT {_col_list(columns)} FROM ("
        f"SELECT {_col_list(columns, '__s.')}, 0 AS __part, __s.__f AS __a, __s.__r AS __b "
        f"FROM __s WHERE __s.__f IN (SELECT UNNEST($touched)) AND NOT {replaced} "
        f"UNION ALL SELECT {_col_list(columns, '__i.')}, 1, 0, __i.__o "
        f"FROM __i JOIN __d USING (__o) WHERE __d.what <> 'keep'"
        f") ORDER BY __part, __a, __b"
    )
    out = _fetch(con, out_sql.replace("$touched", f"{touched or [-1]}"), columns)
    counts = {
        "inserted": inserted,
        "updated": updated,
        "unchanged": unchanged,
        "rows_removed": int(removed_rows[0]) if removed_rows else 0,
    }
    return out, counts, touched


def _delete(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    condition: str,
    key_rows: pa.Table | None,
    resolve_path: Callable[[str], str],
) -> tuple[pa.Table, int, list[int]]:
    """(kept rows of the rewritten files, rows removed, indexes of rewritten files)."""
    con.execute(f"CREATE TEMP TABLE __s AS {ordered_files_sql(con, columns, files, resolve_path)}")
    if key_rows is not None:
        con.register("__k", key_rows)
        match = f"EXISTS (SELECT 1 FROM __k WHERE {condition})"
    else:
        match = f"coalesce(({condition}), false)"
    con.execute(f"CREATE TEMP TABLE __g AS SELECT __f, __r, {match} AS gone FROM __s")
    removed = con.execute("SELECT count(*) FROM __g WHERE gone").fetchone()
    removed_rows = int(removed[0]) if removed else 0
    touched = [
        int(r[0])
        for r in con.execute("SELECT DISTINCT __f FROM __g WHERE gone ORDER BY __f").fetchall()
    ]
    out = _fetch(
        con,
        f"SELECT {_col_list(columns, '__s.')} FROM __s JOIN __g USING (__f, __r) "
        f"WHERE __s.__f IN (SELECT UNNEST({touched or [-1]})) AND NOT __g.gone "
        f"ORDER BY __s.__f, __s.__r",
        columns,
    )
    return out, removed_rows, touched


def _read_ordered(
    con: duckdb.DuckDBPyConnection,
    columns: tuple[Field, ...],
    files: list[DataFile],
    resolve_path: Callable[[str], str],
) -> pa.Table:
    sql = ordered_files_sql(con, columns, files, resolve_path)
    return _fetch(con, f"SELECT {_col_list(columns)} FROM ({sql}) ORDER BY __f, __r", columns)


__all__ = ["Change", "Mutator", "Outcome", "Target", "WrittenFile"]
