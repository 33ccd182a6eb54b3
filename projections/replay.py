"""Rebuild projections from the event log, or verify the stored ones against a rebuild."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from events.model import stream_id_tuple
from events.redis_log import RedisEventLog
from projections.catalog import (
    RegistryState,
    SuperFolder,
    SuperState,
    apply_registry,
)
from projections.store import CommitOutcome, SnapshotStore, encode_table

PAGE = 5000


@dataclass
class ReplayReport:
    events: int = 0
    supers: int = 0
    differences: list[str] = field(default_factory=list)


async def rebuild_registry(log: RedisEventLog, *, upto: str | None = None) -> RegistryState:
    state = RegistryState()
    while True:
        events = await log.read_registry(after=state.position, count=PAGE)
        for event in events:
            if upto is not None and stream_id_tuple(event.id) > stream_id_tuple(upto):
                return state
            state = apply_registry(state, event)
        if len(events) < PAGE:
            return state


async def rebuild_super(
    log: RedisEventLog,
    org: str,
    sup: str,
    *,
    upto: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[SuperState, int]:
    """Fold a super's stream from the start (up to ``upto`` inclusive, if given).

    The next page is read while this one is folded: Redis and the fold overlap."""
    folder = SuperFolder()
    position, count = "0-0", 0

    def state() -> SuperState:
        return SuperState(org=org, name=sup, tables=folder.result(), position=position)

    events = await log.read(org, sup, after=position, count=PAGE)
    while True:
        ahead = None
        if len(events) == PAGE and (upto is None or _before(events[-1].id, upto)):
            ahead = asyncio.ensure_future(log.read(org, sup, after=events[-1].id, count=PAGE))
        try:
            for event in events:
                if upto is not None and not _before(event.id, upto, inclusive=True):
                    return state(), count
                folder.add(event)
                position = event.id
                count += 1
            if progress is not None:
                progress(count)
            if ahead is None:
                return state(), count
            events = await ahead
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()  # an early return or an error: the page is not needed


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A fold keeps every table's files alive: the cyclic collector's full passes over
    them (one per so many allocations) took a third of a replay. Reference counting
    still frees everything a fold drops (its objects hold no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _before(event_id: str, upto: str, *, inclusive: bool = False) -> bool:
    a, b = stream_id_tuple(event_id), stream_id_tuple(upto)
    return a <= b if inclusive else a < b


def diff_supers(live: SuperState, rebuilt: SuperState) -> list[str]:
    """Human-readable differences between two states of the same super."""
    where = f"{live.org}/{live.name}"
    out = []
    for name in sorted(set(live.tables) | set(rebuilt.tables)):
        a, b = live.tables.get(name), rebuilt.tables.get(name)
        if a is None:
            out.append(f"{where}/{name}: missing from the stored snapshot")
        elif b is None:
            out.append(f"{where}/{name}: in the stored snapshot but not in the log")
        elif encode_table(a) != encode_table(b):
            fields = [f for f in a.__struct_fields__ if getattr(a, f) != getattr(b, f)]
            out.append(f"{where}/{name}: differs in {', '.join(fields)}")
    return out


async def replay(
    log: RedisEventLog,
    store: SnapshotStore,
    *,
    verify: bool,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Rebuild every catalog snapshot from the log (or, with ``verify``, compare).

    Verify compares each stored snapshot with a fold of the log up to that snapshot's
    own checkpoint, so it is exact even while a projector keeps committing. Rebuild
    replaces each snapshot with a fold of the whole log, by compare-and-set on the
    checkpoint it read; a projector holding the old state then reloads.
    """
    with _gc_paused():
        return await _replay(log, store, verify=verify, progress=progress)


async def _replay(
    log: RedisEventLog,
    store: SnapshotStore,
    *,
    verify: bool,
    progress: Callable[[int], None] | None,
) -> ReplayReport:
    report = ReplayReport()
    done = 0

    def counted(n: int) -> None:
        if progress is not None:
            progress(done + n)

    live_registry = await store.load_registry()
    registry = await rebuild_registry(log, upto=live_registry.position if verify else None)
    if verify:
        if live_registry.orgs != registry.orgs:
            report.differences.append("registry: stored orgs/supers differ from the log")
    else:
        await store.commit_registry(registry, expected=live_registry.position)
    for org in registry.orgs.values():
        for sup in org.supers:
            for _attempt in range(10):
                live = await store.load_super(org.name, sup)
                upto = live.position if verify else None
                rebuilt, n = await rebuild_super(log, org.name, sup, upto=upto, progress=counted)
                if verify:
                    report.differences += diff_supers(live, rebuilt)
                    break
                stale = [t for t in live.tables if t not in rebuilt.tables]
                outcome = await store.commit_super(
                    rebuilt, expected=live.position, changed=list(rebuilt.tables), removed=stale
                )
                if outcome is CommitOutcome.DONE:
                    break  # else a projector committed meanwhile: fold again
            else:
                report.differences.append(f"{org.name}/{sup}: kept changing, not rebuilt")
            done += n
            report.events += n
            report.supers += 1
    return report
