"""Upserts: merge incoming rows by key (merge-on-read, or copy-on-write per file)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from app.write.append import schema_events
from app.write.bodies import Source, conform_table, plan_schema
from app.write.changes.commit import Change, ChangeLoop, Outcome, Target
from app.write.changes.rows import (
    any_match,
    candidates,
    check_key_list,
    check_upsert_columns,
    merge_rows,
)
from events.errors import InvalidInput
from events.model import DataFile, EventBase, RowsUpserted
from projections.arrow import quote_ident
from projections.catalog import TableState


class Upserts(ChangeLoop):
    """Upserts: merge incoming rows by key (merge-on-read, or copy-on-write per file)."""

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
        key = check_key_list(key)
        inlined = False

        async def prepare(table: TableState | None) -> Change | None:
            plan = plan_schema(table.columns if table else None, source.fields, text=source.text)
            check_upsert_columns(plan, source, key, newer_than)
            incoming, _ = await anyio.to_thread.run_sync(conform_table, source, plan)
            for name in key:
                if incoming.column(name).null_count:
                    raise InvalidInput(
                        f"key column {name!r} has a null in the body", code="null_key"
                    )
            columns = plan.columns
            files = list(table.files) if table else []
            index = self.key_index(target, columns, key, files) if newer_than is None else None
            merged = await anyio.to_thread.run_sync(
                lambda: self._run_sql(
                    lambda con: merge_rows(
                        con,
                        columns,
                        files,
                        incoming,
                        key,
                        newer_than,
                        self.engine.resolve_path,
                        self.in_place,
                        index,
                    )
                )
            )
            out_rows, counts, gone, written = merged
            if counts["inserted"] + counts["updated"] == 0:
                return Change(lambda _: [], {**counts, "key": list(key), "newer_than": newer_than})
            out = await self._output(target, out_rows, columns, inline_ok=True)
            if index is not None and out is not None and written is not None:
                with index.lock:
                    index.adopt(out, written)
            added = [out] if out else []
            nonlocal inlined
            inlined = out is not None and out.is_inline
            removed, inputs, deletes = gone.removal(files)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                out_events = schema_events(table, plan, version, self.writer.mirrors, base)
                version += len(out_events)
                out_events.append(
                    RowsUpserted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=removed,
                        deletes=deletes,
                        key=tuple(key),
                        newer_than=newer_than,
                        **counts,
                        **base,
                    )
                )
                return out_events

            result = {**counts, "key": list(key), "newer_than": newer_than}
            keys = incoming.select(key)
            on = " AND ".join(f"__k.{quote_ident(k)} = __s.{quote_ident(k)}" for k in key)

            def conflicts(new: list[DataFile]) -> bool:
                # A file another writer added since holds one of our keys: compute again.
                maybe = candidates(new, columns, keys, key)
                return bool(maybe) and self._run_sql(
                    lambda con: any_match(con, columns, maybe, on, keys, self.engine.resolve_path)
                )

            return Change(
                events,
                result,
                added,
                inputs,
                columns,
                deletes=deletes,
                rebase=True,
                conflicts=conflicts,
            )

        outcome = await self._commit(target, prepare, allow_new=True)
        if outcome.event_id is None:
            return outcome  # every incoming row matched an identical or newer stored row
        if inlined:  # (a change that inlined nothing cannot have made a flush due)
            await self.after_inline_write(target.org, target.super_, target.table)
        return outcome
