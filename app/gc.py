"""Garbage collection of orphan data files.

A data file is published before the event that references it is appended (see
``app/writes.py``), so a failed or abandoned write can leave a file no event references:
an orphan, invisible to readers. ``collect_garbage`` deletes orphans older than a grace
period and never touches a file that any retained version references.

Order matters for safety against concurrent writes: storage is listed *first*, the log
is read *second*. A file listed but referenced by an event appended after the log was
read is younger than the grace period (appends follow uploads within a write, and a
write that waited longer than half the grace period uploads its file again), so it is
never old enough to be deleted.

Every version is retained today (there is no expiry yet), so "referenced by a retained
version" means referenced by any event in the log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from events.model import RowsAppended, TableOverwritten
from events.redis_log import RedisEventLog
from events.storage import Storage, StoredObject
from projections.reader import CatalogReader

DATA_FILE = re.compile(
    r"^[a-z_][a-z0-9_]*/[a-z_][a-z0-9_]*/[a-z_][a-z0-9_]*/data/[0-9a-f]{32}\.parquet$"
)
PAGE = 5000


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


async def referenced_files(log: RedisEventLog, reader: CatalogReader) -> set[str]:
    """Every data file any event of any super references."""
    registry = await reader.registry()
    keys: set[str] = set()
    for org in registry.orgs.values():
        for sup in org.supers:
            after = "0-0"
            while True:
                events = await log.read(org.name, sup, after=after, count=PAGE)
                for event in events:
                    if isinstance(event, RowsAppended | TableOverwritten):
                        keys.update(f.path for f in event.files)
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
    """Delete (or, with ``dry_run``, only report) orphan data files older than ``grace``."""
    report = GcReport()
    listed = [obj async for obj in storage.list_objects() if DATA_FILE.match(obj.key)]
    live = await referenced_files(log, reader)  # after listing: see the module docstring
    cutoff = (now or datetime.now(UTC)) - grace
    for obj in listed:
        report.scanned += 1
        if obj.key in live:
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
