"""``ledgerlake recover``: rebuild a Redis that was lost from the event archive.

Every archived stream is added back entry by entry under its original ids, then the
state the append scripts keep beside the streams is derived from the events (each
table's version, or ``x<v>`` for a dropped name; the registry's org and super sets), and
every projection is rebuilt by a replay. Mirror statuses are not restored: the mirror
runners publish every table again when they start, a Delta mirror without a new commit
(each publish compares with the log's last one) and an Iceberg mirror anew.

The records of clients' Idempotency-Keys still within their time to live are rebuilt
from the appends that carry them, so a retry after the recovery is answered, not
written twice. Not recovered: leases, rate-limit counters and the mirror statuses above;
and, by definition, the events acknowledged after the archive's last segment (see the
durability notes in the README)."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.services import Services
from events.archive import AUDIT, AUTH, REGISTRY, Archive, Entry, event_of
from events.errors import InvalidInput
from events.model import OrgCreated, SuperCreated, TableDropped
from events.redis_log import guarded
from projections.replay import replay

BATCH = 1000
MAX_APPEND = 64  # the most events one append writes (an overwrite, a restore...)


@dataclass
class RecoverReport:
    streams: int = 0
    events: int = 0
    supers: list[str] = field(default_factory=list)


class NotEmpty(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="redis_not_empty")


async def recover(
    services: Services, *, progress: Callable[[int], None] | None = None
) -> RecoverReport:
    """Rebuild the log in an empty Redis from the archive, then the projections."""
    keys, redis = services.keys, services.redis
    if await guarded(redis.exists(keys.registry_stream, keys.auth_stream)):
        raise NotEmpty(
            "this Redis already holds a Ledgerlake log under the prefix "
            f"{keys.prefix!r}; recover only into an empty one (after a recovery that "
            f"failed half way, delete the keys matching '{keys.prefix}:*' first)"
        )
    archive = Archive(services.storage)
    names = await archive.streams()
    if REGISTRY not in names:
        raise InvalidInput(
            "the storage holds no event archive (.archive/registry/manifests/)",
            code="archive_not_found",
        )
    report = RecoverReport()
    retention = services.settings.stream_retention_s
    cutoff = int((time.time() - retention) * 1000) if retention > 0 else 0
    audit_cutoff = int((time.time() - services.settings.audit_retention_s) * 1000)
    for name in names:
        stream = _stream_key(services, name)
        batch: list[Entry] = []
        versions: dict[str, str] = {}
        # With a stream retention, a super's old events stay in the archive only (as
        # they were before the loss): Redis gets the recent tail and the trimmed mark.
        first_kept, last, skipped = "", "", False
        recent: deque[str] = deque(maxlen=MAX_APPEND)  # the ids of the latest entries
        async for entry in archive.entries(name):
            last = entry[0]
            report.events += 1
            if name == AUDIT and int(entry[0].split("-")[0]) < audit_cutoff:
                continue  # past the audit retention: it would have been trimmed by now
            if name == REGISTRY:
                await _register(services, entry)
            elif name.startswith("supers/"):
                track_version(versions, entry)
                recent.append(entry[0])
                if "i" in entry[1]:
                    await _restore_idempotency(services, name, entry, recent)
                if int(entry[0].split("-")[0]) < cutoff:
                    skipped = True
                    continue
                first_kept = first_kept or entry[0]
            batch.append(entry)
            if len(batch) >= BATCH:
                await add_entries(services, stream, batch)
                batch = []
                if progress is not None:
                    progress(report.events)
        await add_entries(services, stream, batch)
        if skipped:
            org, sup = name.split("/")[1:]
            ms, _, seq = last.partition("-")
            mark = first_kept or f"{ms}-{int(seq) + 1}"
            await guarded(redis.set(keys.trimmed(org, sup), mark))
        if versions:
            org, sup = name.split("/")[1:]
            mapping: dict[Any, Any] = dict(versions)
            await guarded(redis.hset(keys.versions(org, sup), mapping=mapping))
        if name.startswith("supers/"):
            report.supers.append(name.removeprefix("supers/"))
        report.streams += 1
    await replay(services.log, services.store, verify=False)
    return report


async def _restore_idempotency(
    services: Services, name: str, entry: Entry, recent: deque[str]
) -> None:
    """The record of a client's Idempotency-Key that the append of ``entry`` (its last
    event) made, if its time to live has not run out: a retry after the recovery gets
    the first answer instead of writing again."""
    record = json.loads(entry[1]["i"])
    left_ms = int(entry[0].split("-")[0]) + int(record["ttl"]) * 1000 - int(time.time() * 1000)
    if left_ms <= 0 or int(record["n"]) > len(recent):
        return
    org, sup = name.split("/")[1:]
    key = f"{services.keys.tag(org, sup)}:idem:{record['key']}"
    ids = list(recent)[-int(record["n"]) :]
    version = event_of(entry).version
    mapping: dict[Any, Any] = {"fp": record["fp"], "version": version,
                               "ids": ",".join(ids), "result": record["result"]}  # fmt: skip
    await guarded(services.redis.hset(key, mapping=mapping))
    await guarded(services.redis.pexpire(key, left_ms))


def _stream_key(services: Services, name: str) -> str:
    keys = services.keys
    if name == REGISTRY:
        return keys.registry_stream
    if name == AUTH:
        return keys.auth_stream
    if name == AUDIT:
        return keys.audit_stream
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "supers":
        raise InvalidInput(f"unknown archived stream {name!r}", code="archive_corrupt")
    return keys.stream(parts[1], parts[2])


async def add_entries(services: Services, stream: str, batch: list[Entry]) -> int:
    if not batch:
        return 0
    pipe: Any = services.redis.pipeline(transaction=False)
    for entry_id, fields in batch:
        pipe.xadd(stream, fields, id=entry_id)
    await guarded(pipe.execute())
    return len(batch)


async def _register(services: Services, entry: Entry) -> None:
    """The registry's sets, which the registry script checks before adding an org or a
    super."""
    event = event_of(entry)
    keys = services.keys
    if isinstance(event, OrgCreated):
        await guarded(services.redis.sadd(keys.registry_orgs, event.org))
    elif isinstance(event, SuperCreated):
        await guarded(services.redis.sadd(keys.registry_supers, f"{event.org}/{event.super_}"))


def track_version(versions: dict[str, str], entry: Entry) -> None:
    """Each table's version after its last event, as the append script keeps it."""
    event = event_of(entry)
    if event.table:
        dropped = isinstance(event, TableDropped)
        versions[event.table] = f"x{event.version}" if dropped else str(event.version)
