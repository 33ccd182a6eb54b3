"""``ledgerlake rebuild-from-storage``: the last resort when both Redis and the event
archive are lost. LOSSY: the history is gone; what comes back is each table's latest
rows, as the storage still shows them.

For each table found in the storage (``<org>/<super>/<table>/``), the rows come from:

1. its Delta mirror (the latest commit), else
2. its Iceberg mirror (the newest metadata file), else
3. every data file of the table, all versions together: rows that a delete, an upsert
   or an overwrite replaced come back, and a write that failed before its event (an
   orphan file) counts too. Labelled as such in the report.

The rows are written again as a new table (its first version), through the normal
write path, into an empty Redis. Types a mirror lacks come back in the mirror's type
(an unsigned integer as a decimal, a time as text in Delta). Principals, tokens, grants
and policies are not in the storage: recreate them (an admin token is bootstrapped as
for a new deployment)."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from app.services import Services
from app.write.request import IngestRequest
from events.archive import ROOT as ARCHIVE_ROOT
from events.errors import InvalidInput
from events.model import stream_id_tuple
from events.redis_log import guarded
from mirrors.access import Access, access_for
from mirrors.delta import POSITION

_TABLE_DIR = re.compile(
    r"^(?P<org>[a-z_][a-z0-9_]*)/(?P<super>[a-z_][a-z0-9_]*)/(?P<table>[a-z_][a-z0-9_]*)/"
    r"(?P<rest>.+)$"
)
_ICEBERG_METADATA = re.compile(r"^metadata/(?P<version>\d+)-[^/]*\.metadata\.json$")


@dataclass
class Rebuilt:
    table: str
    source: str
    rows: int
    lossy: str = ""


@dataclass
class RebuildReport:
    tables: list[Rebuilt] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Found:
    delta: bool = False
    iceberg: list[tuple[int, str]] = field(default_factory=list)  # (version, key)
    data: list[str] = field(default_factory=list)


async def rebuild_from_storage(
    services: Services,
    *,
    ignore_archive: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    keys = services.keys
    if await guarded(services.redis.exists(keys.registry_stream)):
        raise InvalidInput(
            "this Redis already holds a Ledgerlake log; rebuild only into an empty one",
            code="redis_not_empty",
        )
    found: dict[tuple[str, str, str], _Found] = defaultdict(_Found)
    has_archive = False
    async for obj in services.storage.list_objects():
        if obj.key.startswith(ARCHIVE_ROOT + "/"):
            has_archive = True
            continue
        match = _TABLE_DIR.match(obj.key)
        if match is None:
            continue
        entry = found[(match["org"], match["super"], match["table"])]
        rest = match["rest"]
        if rest.startswith("_delta_log/"):
            entry.delta = True
        elif (m := _ICEBERG_METADATA.match(rest)) is not None:
            entry.iceberg.append((int(m["version"]), obj.key))
        elif rest.startswith("data/") and rest.endswith(".parquet"):
            entry.data.append(obj.key)
    if has_archive and not ignore_archive:
        raise InvalidInput(
            "the storage holds an event archive: `ledgerlake recover` restores the whole "
            "log from it, with its history (pass --ignore-archive to rebuild anyway)",
            code="archive_exists",
        )
    access = access_for(services.storage)
    report = RebuildReport()
    done = 0
    for (org, sup, table), entry in sorted(found.items()):
        name = f"{org}/{sup}/{table}"
        rows, source, lossy = await anyio.to_thread.run_sync(
            _latest_rows, access, f"{org}/{sup}/{table}", entry
        )
        if rows is None or rows.num_rows == 0:
            report.skipped.append(f"{name}: {source or 'no readable rows'}")
            continue
        await _write(services, org, sup, table, rows)
        report.tables.append(Rebuilt(name, source, rows.num_rows, lossy))
        done += rows.num_rows
        if progress is not None:
            progress(done)
    return report


def _latest_rows(access: Access, prefix: str, found: _Found) -> tuple[pa.Table | None, str, str]:
    """The table's latest rows, where they were read from, and what may be wrong. Of
    the two mirrors, the one whose last commit is the later change of the log (its
    ``ledgerlake.position``) wins: a mirror can lag (a runner down, a failed publish)."""
    from deltalake import DeltaTable
    from pyiceberg.table import StaticTable

    candidates: list[tuple[tuple[int, int], str, Callable[[], pa.Table]]] = []
    errors = []
    if found.delta:
        try:
            dt = DeltaTable(access.uri(prefix), storage_options=access.delta_options or None)
            marks = dt.history(1)[0] if dt.version() >= 0 else {}
            at = stream_id_tuple(str(marks.get(POSITION) or "0-0"))
            candidates.append((at, f"delta mirror, version {dt.version()}", dt.to_pyarrow_table))
        except Exception as exc:  # a damaged mirror: try the next source
            errors.append(f"delta: {exc}")
    if found.iceberg:
        try:
            _version, key = max(found.iceberg)
            static = StaticTable.from_metadata(access.uri(key), properties=access.iceberg_props)
            at = stream_id_tuple(static.properties.get(POSITION) or "0-0")
            name = f"iceberg mirror, {key.rsplit('/', 1)[-1]}"
            candidates.append((at, name, lambda: static.scan().to_arrow()))
        except Exception as exc:  # as above
            errors.append(f"iceberg: {exc}")
    if candidates:
        candidates.sort(key=lambda c: (c[0], c[1].startswith("delta")))  # a tie: Delta
        at, source, read = candidates[-1]
        lossy = DROPPED_NOTE
        if len(candidates) == 2 and candidates[0][0] != at:
            lossy = (f"the mirrors disagreed: the {candidates[0][1]} was older and was not "
                     "used; " + lossy)  # fmt: skip
        return read(), source, lossy
    if found.data:
        fs, root = access.filesystem()
        parts = [pq.read_table(root + key, filesystem=fs) for key in sorted(found.data)]
        rows = pa.concat_tables(parts, promote_options="permissive")
        lossy = (
            "no mirror to say which files were current: the rows of every version "
            "together (deleted, replaced and orphan rows included), without the rows of "
            "small writes kept inline in the lost events; " + DROPPED_NOTE
        )
        if errors:
            lossy += f"; mirrors unreadable ({'; '.join(errors)})"
        return rows, f"{len(found.data)} data files", lossy
    return None, "; ".join(errors), ""


DROPPED_NOTE = "a table dropped before the loss comes back while gc has not deleted its files"


async def _write(services: Services, org: str, sup: str, table: str, rows: pa.Table) -> None:
    staged = services.storage.staging_file(".parquet")
    try:
        await anyio.to_thread.run_sync(pq.write_table, rows, staged)
        await services.writer.ingest(
            IngestRequest(
                org=org,
                super_=sup,
                table=table,
                source=staged,
                fmt="parquet",
                mode="append",
                actor="rebuild-from-storage",
                request_id=uuid.uuid4().hex,
            )
        )
    finally:
        staged.unlink(missing_ok=True)
