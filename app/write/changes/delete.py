"""Deletes by key list or restricted condition (merge-on-read, or copy-on-write per
file)."""

from __future__ import annotations

from typing import Any

import anyio

from app.write.changes.commit import Change, ChangeLoop, Outcome, Target
from app.write.changes.rows import any_match, candidates, delete_rows, key_table
from events.errors import InvalidInput
from events.model import DataFile, EventBase, RowsDeleted
from projections.arrow import quote_ident
from projections.catalog import TableState
from projections.query.predicate import check_predicate


class Deletes(ChangeLoop):
    """Deletes by key list or restricted condition."""

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
                index = None
            else:
                assert keys is not None
                key_rows = key_table(keys, table.columns)
                index = self.key_index(target, table.columns, key_rows.column_names, table.files)
                files = (
                    list(table.files)
                    if index is not None
                    else candidates(table.files, table.columns, key_rows, key_rows.column_names)
                )
                condition = " AND ".join(
                    f"__k.{quote_ident(c)} = __s.{quote_ident(c)}" for c in key_rows.column_names
                )
            out_rows, removed_rows, gone = await anyio.to_thread.run_sync(
                lambda: self._run_sql(
                    lambda con: delete_rows(
                        con,
                        table.columns,
                        files,
                        condition,
                        key_rows,
                        self.engine.resolve_path,
                        self.in_place,
                        index,
                    )
                )
            )
            if removed_rows == 0:
                return Change(lambda _: [], {"rows_removed": 0})
            out = await self._output(target, out_rows, table.columns, inline_ok=True)
            added = [out] if out else []
            removed, inputs, deletes = gone.removal(files)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                return [
                    RowsDeleted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=removed,
                        deletes=deletes,
                        rows_removed=removed_rows,
                        where=condition if where is not None else None,
                        keys=keys,
                        **base,
                    )
                ]

            def conflicts(new: list[DataFile]) -> bool:
                # A file another writer added since holds a row to delete: compute again.
                maybe = (
                    new
                    if key_rows is None
                    else candidates(new, table.columns, key_rows, key_rows.column_names)
                )
                return bool(maybe) and self._run_sql(
                    lambda con: any_match(
                        con, table.columns, maybe, condition, key_rows, self.engine.resolve_path
                    )
                )

            return Change(
                events,
                {"rows_removed": removed_rows},
                added,
                inputs,
                table.columns,
                deletes=deletes,
                rebase=True,
                conflicts=conflicts,
            )

        return await self._commit(target, prepare)
