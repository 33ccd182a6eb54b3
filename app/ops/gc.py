"""Garbage collection of orphan data files.

A data file is published before the event that references it is appended (see
``app/write/append.py``), so a failed or abandoned write can leave a file no event references:
an orphan, invisible to readers. ``collect_garbage`` deletes orphans older than a grace
period and never touches a file that any retained version references.

The mirrors' copies of batches they cannot reference in place (``<table>/mirror/<format>/``,
see ``mirrors/plan.py``) are collected by the same rule: a copy is garbage once its batch
is in no retained version of a live table, and it is older than the grace period. The
mirrors' own metadata (``_delta_log/``, ``metadata/``) is never gc's business.

Order matters for safety against concurrent writes: storage is listed *first*, the log
is read *second*. A file listed but referenced by an event appended after the log was
read is younger than the grace period (appends follow uploads within a write, and a
write that waited longer than half the grace period uploads its file again), so it is
never old enough to be deleted.

Two more guards. Writers record the largest grace period they were started with in
Redis, and gc refuses a shorter one (a writer re-uploads only after half of *its* grace).
And gc only considers files under supers the log knows: pointed at the wrong (or an
empty) Redis, it finds nothing to delete instead of everything.

A file is referenced when a *retained* version of a live table holds it (the files of a
dropped table, or of an earlier incarnation of a re-created one, are garbage): the version
``retained_from`` (the oldest one ``ledgerlake expire`` left) or any later one. Files only
expired versions held become garbage. Versions are read from the log *after* the table
states, so an expiry committed in between only makes gc keep more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from events.model import DataFile, Event, stream_id_tuple
from events.redis_log import RedisEventLog, writer_grace
from events.storage.port import Storage, StoredObject
from mirrors.plan import copy_name
from projections.catalog import TableState, apply_table
from projections.reader import CatalogReader

DATA_FILE = re.compile(
    r"^(?P<org>[a-z_][a-z0-9_]*)/(?P<super>[a-z_][a-z0-9_]*)/[a-z_][a-z0-9_]*/data/"
    r"[0-9a-f]{32}\.parquet$"
)
# A mirror's copy of a batch it cannot reference in place (mirrors/plan.py): garbage once
# the batch (data/<name>.parquet or inline/<name>) is in no retained version.
MIRROR_COPY = re.compile(
    r"^(?P<org>[a-z_][a-z0-9_]*)/(?P<super>[a-z_][a-z0-9_]*)/[a-z_][a-z0-9_]*/mirror/"
    r"[a-z]+/(?P<name>[0-9a-f]{32}(?:-d[0-9]+)?)\.parquet$"
)
PAGE = 5000


class GcRefused(Exception):
    """gc would not be safe with these arguments."""


@dataclass
class GcReport:
    scanned: int = 0
    referenced: int = 0
    young: int = 0
    orphans: list[StoredObject] = field(default_factory=list)
    deleted: int = 0

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)


def event_files(event: Event) -> tuple[DataFile, ...]:
    """The files an event adds to its table."""
    files: tuple[DataFile, ...] = getattr(event, "files", ())
    return files


async def referenced_files(
    log: RedisEventLog,
    reader: CatalogReader,
    supers: list[tuple[str, str]],
    *,
    with_states: bool = False,
) -> set[str]:
    """Every batch (data file key, or ``inline/<name>``) a retained version of a table
    of these supers holds, and for a file with deleted rows each state of it (its
    ``DataFile.identity``), whose mirror copies stay (a stale copy of the file without
    deleted rows stays too while the file does: kept longer, never too short)."""
    keys: set[str] = set()
    for org, sup in supers:
        current = (await reader.super_state(org, sup)).tables
        states: dict[str, TableState] = {}
        seeded: set[str] = set()
        after = "0-0"
        while True:
            events = await log.read(org, sup, after=after, count=PAGE)
            for event in events:
                table = current.get(event.table)
                if table is None or stream_id_tuple(event.id) < stream_id_tuple(
                    table.incarnation or "0-0"
                ):
                    continue  # a dropped table, or an earlier incarnation of this one
                state = apply_table(event, states.get(event.table))
                if state is None:
                    continue
                states[event.table] = state
                if state.version < table.retained_from:
                    continue
                # The oldest retained version: all its files; each later one: the files
                # it added, and those whose deletion vector it changed (by identity).
                added = state.files if event.table not in seeded else event_files(event)
                seeded.add(event.table)
                keys.update(f.path for f in added)
                if with_states:
                    keys.update(f.identity for f in added)
                    changed = {d.path for d in getattr(event, "deletes", ())}
                    keys.update(f.identity for f in state.files if f.path in changed)
            if len(events) < PAGE:
                break
            after = events[-1].id
    return keys


async def collect_garbage(
    log: RedisEventLog,
    reader: CatalogReader,
    storage: Storage,
    *,
    grace: timedelta,
    dry_run: bool,
    now: datetime | None = None,
) -> GcReport:
    """Delete (or, with ``dry_run``, only report) orphan data files older than ``grace``.

    Raises GcRefused if ``grace`` is shorter than what the writers were started with."""
    minimum = await writer_grace(log.client, log.keys)
    if grace.total_seconds() < minimum:
        raise GcRefused(
            f"a grace period of {grace.total_seconds():g}s is shorter than the "
            f"{minimum:g}s the writers were started with (LEDGERLAKE_GC_GRACE_S): files of "
            "writes still in flight could be deleted"
        )
    report = GcReport()
    cutoff = (now or datetime.now(UTC)) - grace  # taken before listing: errs on keeping
    registry = await reader.registry()
    known = {(org.name, sup) for org in registry.orgs.values() for sup in org.supers}
    listed = []
    async for obj in storage.list_objects():
        match = DATA_FILE.match(obj.key) or MIRROR_COPY.match(obj.key)
        # Only supers the log knows: against a wrong or empty Redis nothing is a
        # candidate, rather than everything.
        if match and (match["org"], match["super"]) in known:
            listed.append(obj)
    live = await referenced_files(
        log, reader, sorted(known), with_states=True
    )  # after listing: see the docstring
    names = {copy_name(key) for key in live}
    for obj in listed:
        report.scanned += 1
        copy = MIRROR_COPY.match(obj.key)
        if obj.key in live or (copy is not None and copy["name"] in names):
            report.referenced += 1
        elif obj.modified > cutoff:
            report.young += 1
        else:
            report.orphans.append(obj)
    if not dry_run:
        for obj in report.orphans:
            await storage.delete(obj.key)
            report.deleted += 1
    return report


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 30m, 2h, 7d)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
