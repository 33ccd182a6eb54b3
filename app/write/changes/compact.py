"""Compaction: merge small files and inlined batches, and flush inlined rows once
enough have accumulated."""

from __future__ import annotations

import logging

import anyio
import pyarrow as pa

from app.write.changes.commit import Change, ChangeLoop, Outcome, Target
from app.write.changes.rows import read_ordered
from events.model import DataFile, EventBase, Field, TableCompacted
from projections.catalog import TableState

log = logging.getLogger("ledgerlake.mutations")


class Compaction(ChangeLoop):
    """Compaction: merge small files and inlined batches, and flush inlined rows once"""

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
            paths: list[str] = []
            try:
                for group in groups:
                    rows = await anyio.to_thread.run_sync(self._read_group, table.columns, group)
                    out = await self._output(target, rows, table.columns, inline_ok=False)
                    if out is not None:
                        added.append(out)
                    inputs.extend(f.identity for f in group)
                    paths.extend(f.path for f in group)
            except BaseException:
                for data_file in added:
                    await self.writer.discard(data_file)
                raise
            total = sum(f.live_rows for g in groups for f in g)
            base = target.base()

            def events(version: int) -> list[EventBase]:
                return [
                    TableCompacted(
                        version=version + 1,
                        files=tuple(added),
                        removed_files=tuple(paths),
                        rows=total,
                        **base,
                    )
                ]

            result = {"files_removed": len(paths), "files_added": len(added), "rows": total}
            return Change(events, result, added, tuple(inputs), table.columns, rebase=True)

        return await self._commit(target, prepare, outside_turn=True)

    def _read_group(self, columns: tuple[Field, ...], files: list[DataFile]) -> pa.Table:
        return self._run_sql(
            lambda con: read_ordered(con, columns, files, self.engine.resolve_path)
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
        # Files with many deleted rows are folded (rewritten without them), alone or
        # with the small files.
        chosen = {f.path for f in small}
        deleted = [
            f
            for f in table.files
            if not inline_only
            and f.path not in chosen
            and f.deleted is not None
            and f.deleted.count >= self.compact_deleted_ratio * f.rows
        ]
        small = [f for f in table.files if f.path in chosen or f in deleted]
        if not inline and len(small) < 2 and not deleted:
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
        # A lone Parquet file is already as compact as it gets, unless rows are deleted.
        return [g for g in groups if len(g) > 1 or g[0].is_inline or g[0].deleted is not None]

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
