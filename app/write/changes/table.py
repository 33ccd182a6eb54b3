"""Changes to a whole table: restore a version, drop, choose mirrors, set policies,
expire old versions."""

from __future__ import annotations

from datetime import datetime

import msgspec

from app.write.changes.commit import Change, ChangeLoop, Outcome, Target
from events.model import (
    EventBase,
    MirrorsChanged,
    PoliciesSet,
    Policy,
    TableDropped,
    TableRestored,
    VersionsExpired,
)
from projections.catalog import TableState


class TableChanges(ChangeLoop):
    """Changes to a whole table: restore a version, drop, choose mirrors, set policies,"""

    async def restore(self, target: Target, version: int) -> Outcome:
        """Make ``version`` (schema and files) current again, as a new version."""

        async def prepare(table: TableState | None) -> Change | None:
            assert table is not None
            old = await self.reader.table_at(
                target.org, target.super_, target.table, version=version
            )
            # By identity: a file whose deletion vector differs is removed and added
            # back as it was then.
            current = {f.identity for f in table.files}
            wanted = {f.identity for f in old.files}
            added = tuple(f for f in old.files if f.identity not in current)
            removed = tuple(f.path for f in table.files if f.identity not in wanted)
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
