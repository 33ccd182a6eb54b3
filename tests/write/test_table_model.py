"""The write semantics of one table against a plain in-memory model (hypothesis).

Random sequences of appends, overwrites, upserts (with and without ``newer_than``),
deletes by key and by ``where``, compactions, restores and expiries run both on
Ledgerlake (through the services, no HTTP) and on a model: a list of rows per table
version. After every step the current contents equal the model's, a past version read
by ``t AT (VERSION => n)`` or ``t AT (TIMESTAMP => ...)`` equals the model's history (or
is ``Gone`` once expired), and the events each step appended are the ones it should
(none for a change that changes nothing). At the end of each example the projected
snapshots must equal a replay of the log.

Runs with inlining off and on (inlined batches must behave exactly like files), with
deletion vectors (the default; and covering whole files, folded in late) and with
copy-on-write: all must give the same rows.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.from_thread
import hypothesis
import msgspec
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from app.services import Services
from app.settings import Settings
from app.write.bodies import open_source
from app.write.changes.commit import Outcome, Target
from app.write.request import IngestRequest, IngestResult
from events.errors import Gone, InvalidInput, NotFound
from events.model import DataFile, Event, now
from projections.catalog import SuperState, TableState
from projections.query.types import Analysis
from projections.reader import CatalogReader
from projections.replay import replay
from projections.store import encode_table

ORG, SUP, TABLE = "o", "s", "t"
NEIGHBOUR = "u"  # another table of the same super (one stream for both)
Row = tuple[int | None, int | None, int | None]

# Inlining on, with a flush after every 4 inlined batches (so flushes happen).
INLINE = {"inline_max_rows": 100, "inline_flush_files": 4}
MODES: dict[str, dict[str, Any]] = {
    "files": {},
    "inlined": INLINE,
    # Deletion vectors may cover whole files, and compaction folds them in late.
    "deletion-vectors": {"deletion_max_ratio": 1.0, "compact_deleted_ratio": 0.6},
    "copy-on-write": {"deletion_vectors": False},
    # Changes find stored rows by scanning the files, not by the key index.
    "scanned": {"key_index_rows": 0},
}

# -- strategies -------------------------------------------------------------------------

ids = st.integers(0, 4)
values = st.none() | st.integers(-3, 3)
stamps = st.none() | st.integers(0, 3)

# Appended rows: any column may be null or missing (not all: a row needs a value).
append_row = st.fixed_dictionaries(
    {}, optional={"id": st.none() | ids, "v": values, "ts": stamps}
).filter(bool)
append_rows = st.lists(append_row, max_size=5)
# The first write types every column (int64), so no version ever lacks a column.
create_rows = st.lists(
    st.fixed_dictionaries({"id": ids, "v": st.integers(-3, 3), "ts": st.integers(0, 3)}),
    min_size=1,
    max_size=4,
)
# Upserted rows always carry a non-null key; v and ts may be null or missing.
upsert_row = st.fixed_dictionaries({"id": ids}, optional={"v": values, "ts": stamps})


def upsert_rows(stored: list[Row]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Fresh rows, and copies of stored rows (some identical: unchanged; some with the
    same ts: not newer)."""
    keyed = sorted({r for r in stored if r[0] is not None}, key=canon_key)
    row = upsert_row
    if keyed:
        row = row | st.sampled_from(keyed).flatmap(
            lambda r: st.fixed_dictionaries(
                {"id": st.just(r[0]), "v": st.just(r[1]) | values, "ts": st.just(r[2]) | stamps}
            )
        )
    return st.lists(row, min_size=1, max_size=5)


# (SQL, the same predicate in Python with SQL's null logic: NULL -> not deleted)
WHERES: list[Callable[[int, int], tuple[str, Callable[[Row], bool]]]] = [
    lambda x, _y: (f"v < {x}", lambda r: r[1] is not None and r[1] < x),
    lambda x, _y: (
        f"ts >= {x} or v is null",
        lambda r: (r[2] is not None and r[2] >= x) or r[1] is None,
    ),
    lambda x, y: (f"id in ({x}, {y})", lambda r: r[0] is not None and r[0] in (x, y)),
]


# -- the model --------------------------------------------------------------------------


def as_row(body_row: dict[str, Any]) -> Row:
    return (body_row.get("id"), body_row.get("v"), body_row.get("ts"))


def _null_first(value: int | None) -> tuple[bool, int]:
    return (value is not None, value or 0)


def canon_key(row: Row) -> tuple[tuple[bool, int], ...]:
    return tuple(_null_first(c) for c in row)


def canon(rows: list[Row]) -> list[Row]:
    """A multiset of rows as a sorted list (nulls first)."""
    return sorted(rows, key=canon_key)


def model_upsert(
    stored: list[Row], body: list[dict[str, Any]], newer_than: bool
) -> tuple[list[Row], dict[str, int]]:
    """The documented merge: in-batch dedupe by key (last wins, or greatest ts with nulls
    lowest, ties: last); with newer_than, skip a row whose ts is null or not greater than
    the greatest stored ts of its key; a row identical to the single stored row of its
    key is unchanged; an applied row replaces every stored row of its key."""
    chosen: dict[int, Row] = {}
    for row in map(as_row, body):
        key = row[0]
        assert key is not None
        prev = chosen.get(key)
        if prev is None or not newer_than or _null_first(row[2]) >= _null_first(prev[2]):
            chosen[key] = row
    out = list(stored)
    counts = {"inserted": 0, "updated": 0, "unchanged": 0, "rows_removed": 0}
    for key, row in chosen.items():
        matches = [r for r in stored if r[0] == key]
        if not matches:
            counts["inserted"] += 1
            out.append(row)
            continue
        stamps_ = [r[2] for r in matches if r[2] is not None]
        newest = max(stamps_) if stamps_ else None
        not_newer = newer_than and (row[2] is None or (newest is not None and row[2] <= newest))
        if not_newer or (len(matches) == 1 and matches[0] == row):
            counts["unchanged"] += 1
            continue
        counts["updated"] += 1
        counts["rows_removed"] += len(matches)
        out = [r for r in out if r[0] != key]
        out.append(row)
    return out, counts


# -- talking to the services ------------------------------------------------------------


def _views(services: Services, state: SuperState) -> Callable[[Analysis], Any]:
    """Like the query route's resolver: past versions through ``reader.table_at``."""

    async def resolve(analysis: Analysis) -> dict[str, TableState]:
        views: dict[str, TableState] = {}
        for ref in analysis.refs:
            if ref.name not in state.tables:
                continue
            if ref.version is None and ref.time is None:
                views[ref.view] = state.tables[ref.name]
            else:
                views[ref.view] = await services.reader.table_at(
                    ORG, SUP, ref.name, version=ref.version, at=ref.time
                )
        return views

    return resolve


async def query_rows(services: Services, at: str = "", table: str = TABLE) -> list[Row]:
    state = await services.reader.super_state(ORG, SUP)
    result = await services.engine.run(
        _views(services, state), f"select * from {table} {at}", limit=10_000
    )
    return canon([as_row(r) for r in result.table.to_pylist()])


class TableMachine(RuleBasedStateMachine):
    """One table, driven through the services and mirrored by a model."""

    def __init__(
        self, portal: anyio.from_thread.BlockingPortal, base: Settings, workdir: Path
    ) -> None:
        super().__init__()
        self.portal = portal
        self.workdir = workdir / uuid.uuid4().hex
        self.settings = msgspec.structs.replace(
            base, data_dir=self.workdir / "data", redis_prefix=f"m{uuid.uuid4().hex[:12]}"
        )
        self.inline = self.settings.inline_max_rows > 0
        self._cm: AbstractContextManager[Services] = portal.wrap_async_context_manager(
            Services.open(self.settings, self.settings.redis_url)
        )
        self.services = self._cm.__enter__()
        # The model: the rows of every version, each version's commit time, and which
        # versions are still retained.
        self.contents: dict[int, list[Row]] = {}
        self.times: dict[int, datetime] = {}
        self.version = -1
        self.retained_from = 0
        self.last_event = "0-0"
        self.neighbour: list[Row] | None = None  # the other table's rows, once created

    # -- plumbing ------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.portal.call(fn, *args)

    def body(self, rows: list[dict[str, Any]]) -> Path:
        path = self.workdir / f"{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(rows))
        return path

    def target(self) -> Target:
        return Target(ORG, SUP, TABLE)

    def ingest(self, rows: list[dict[str, Any]], mode: str, table: str = TABLE) -> IngestResult:
        req = IngestRequest(ORG, SUP, table, self.body(rows), "json", mode=mode)
        result: IngestResult = self.run(self.services.writer.ingest, req)
        return result

    def call_upsert(self, rows: list[dict[str, Any]], newer_than: str | None) -> Outcome:
        async def go() -> Outcome:
            state = await self.services.reader.super_state(ORG, SUP)
            current = state.tables.get(TABLE)
            known = {f.name: f.type for f in current.columns} if current else {}
            source = await anyio.to_thread.run_sync(open_source, self.body(rows), "json", known)
            return await self.services.mutator.upsert(self.target(), source, ["id"], newer_than)

        outcome: Outcome = self.run(go)
        return outcome

    def table(self) -> TableState:
        async def go() -> TableState:
            return await self.services.reader.require_table(ORG, SUP, TABLE)

        state: TableState = self.run(go)
        return state

    def new_events(self) -> list[Event]:
        async def go() -> list[Event]:
            return await self.services.log.read(ORG, SUP, after=self.last_event, count=10_000)

        events: list[Event] = self.run(go)
        return [e for e in events if e.table == TABLE]

    def commit(self, expected: list[str], rows: list[Row] | None, *, flush: bool = False) -> None:
        """Check the events the step appended (``expected`` types, plus a flush of the
        inlined rows when ``flush`` may happen) and record them in the model: a version
        per event, with ``rows`` for the step's own change."""
        events = self.new_events()
        types = [type(e).__name__ for e in events]
        allowed = [expected]
        if flush and self.inline and expected:
            allowed.append([*expected, "TableCompacted"])
        assert types in allowed, f"events {types}, expected one of {allowed}"
        for event in events:
            assert event.version == self.version + 1, (event.version, self.version)
            kind = type(event).__name__
            if kind == "TableCreated":
                contents: list[Row] = []
            elif kind in ("SchemaEvolved", "TableCompacted", "VersionsExpired"):
                contents = self.contents[self.version]
            else:
                assert rows is not None
                contents = canon(rows)
            self.version = event.version
            self.contents[event.version] = contents
            self.times[event.version] = event.time
            self.last_event = event.id
        if flush and self.inline and events:
            # A write that added an inlined batch flushes once there are enough.
            assert len(self.table().inline_files) < self.settings.inline_flush_files

    @property
    def current(self) -> list[Row]:
        return self.contents[self.version]

    def at_time(self, at: datetime) -> int | None:
        """The version current at instant ``at`` (the last committed at or before it)."""
        return max((v for v, t in self.times.items() if t <= at), default=None)

    # -- rules ---------------------------------------------------------------------------

    @initialize(
        rows=create_rows,
        how=st.sampled_from(["append", "overwrite", "upsert"]),
        rnd=st.randoms(use_true_random=False),
    )
    def create(self, rows: list[dict[str, Any]], how: str, rnd: random.Random) -> None:
        self.rnd = rnd  # picks the past version each step reads
        if how == "upsert":
            outcome = self.call_upsert(rows, None)
            expected, counts = model_upsert([], rows, newer_than=False)
            assert outcome.result["inserted"] == counts["inserted"]
            self.commit(["TableCreated", "RowsUpserted"], expected, flush=True)
        else:
            # An overwrite of a table that does not exist yet is an append.
            result = self.ingest(rows, how)
            assert result.rows == len(rows)
            self.commit(["TableCreated", "RowsAppended"], list(map(as_row, rows)), flush=True)
        assert all(f.is_inline for f in self.table().files) == self.inline

    @rule(rows=append_rows)
    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            with pytest.raises(InvalidInput):
                self.ingest(rows, "append")
            self.commit([], None)
            return
        result = self.ingest(rows, "append")
        assert (result.rows, result.version) == (len(rows), self.version + 1)
        self.commit(["RowsAppended"], self.current + list(map(as_row, rows)), flush=True)

    @rule(batches=st.lists(append_rows.filter(bool), min_size=2, max_size=4))
    def append_batches(self, batches: list[list[dict[str, Any]]]) -> None:
        """A burst of small appends: many files (or inlined batches, then a flush)."""
        for rows in batches:
            self.ingest(rows, "append")
            self.commit(["RowsAppended"], self.current + list(map(as_row, rows)), flush=True)

    @rule(rows=append_rows)
    def overwrite(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            with pytest.raises(InvalidInput):
                self.ingest(rows, "overwrite")
            self.commit([], None)
            return
        result = self.ingest(rows, "overwrite")
        assert (result.rows, result.version) == (len(rows), self.version + 1)
        self.commit(["TableOverwritten"], list(map(as_row, rows)), flush=True)

    @rule(data=st.data())
    def upsert_plain(self, data: st.DataObject) -> None:
        rows = data.draw(upsert_rows(self.current), label="rows")
        self.check_upsert(rows, newer=False)

    @rule(data=st.data())
    def upsert_newer_than(self, data: st.DataObject) -> None:
        rows = data.draw(upsert_rows(self.current), label="rows")
        if not any("ts" in r for r in rows):
            rows = [{**rows[0], "ts": None}, *rows[1:]]  # newer_than needs the column
        self.check_upsert(rows, newer=True)

    def check_upsert(self, rows: list[dict[str, Any]], *, newer: bool) -> None:
        expected, counts = model_upsert(self.current, rows, newer)
        outcome = self.call_upsert(rows, "ts" if newer else None)
        got = {k: outcome.result[k] for k in counts}
        assert got == counts, f"upsert {rows} newer_than={newer}: {got} != {counts}"
        changed = counts["inserted"] + counts["updated"] > 0
        assert (outcome.event_id is not None) == changed
        self.commit(["RowsUpserted"] if changed else [], expected, flush=True)

    @rule(keys=st.lists(ids, min_size=1, max_size=3))
    def delete_keys(self, keys: list[int]) -> None:
        kept = [r for r in self.current if r[0] not in keys]
        removed = len(self.current) - len(kept)
        outcome = self.run(lambda: self.services.mutator.delete(self.target(), keys={"id": keys}))
        assert outcome.result["rows_removed"] == removed
        self.commit(["RowsDeleted"] if removed else [], kept)

    @rule(form=st.sampled_from(WHERES), x=st.integers(-3, 4), y=ids)
    def delete_where(self, form: Any, x: int, y: int) -> None:
        where, matches = form(x, y)
        kept = [r for r in self.current if not matches(r)]
        removed = len(self.current) - len(kept)
        outcome = self.run(lambda: self.services.mutator.delete(self.target(), where=where))
        assert outcome.result["rows_removed"] == removed, where
        self.commit(["RowsDeleted"] if removed else [], kept)

    @rule()
    def compact(self) -> None:
        before = self.table()
        outcome = self.run(self.services.mutator.compact, self.target())
        # Something to merge: an inlined batch, enough small Parquet files, or a file
        # with enough deleted rows to fold in.
        small = [f for f in before.files if not f.is_inline]
        due = (
            bool(before.inline_files)
            or len(small) >= self.settings.compact_min_files
            or any(self.deleted_enough(f) for f in before.files)
        )
        assert (outcome.event_id is not None) == due
        self.commit(["TableCompacted"] if due else [], self.current)
        assert not self.table().inline_files
        assert not any(self.deleted_enough(f) for f in self.table().files)

    def deleted_enough(self, f: DataFile) -> bool:
        ratio = self.settings.compact_deleted_ratio
        return f.deleted is not None and f.deleted.count >= ratio * f.rows

    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        version = data.draw(st.integers(0, self.version), label="restore to")
        if version < self.retained_from:
            with pytest.raises(Gone):
                self.run(self.services.mutator.restore, self.target(), version)
            self.commit([], None)
            return
        self.run(self.services.mutator.restore, self.target(), version)
        self.commit(["TableRestored"], self.contents[version])

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        how = data.draw(st.sampled_from(["version"] * 3 + ["now", "before"]), label="cutoff")
        if how == "version":
            v = data.draw(st.integers(0, self.version), label="at the time of version")
            cutoff = self.times[v]
        elif how == "now":
            cutoff = now()
        else:
            cutoff = self.times[0] - timedelta(seconds=1)
        keep = self.at_time(cutoff)
        expires = keep is not None and keep > self.retained_from
        outcome = self.run(self.services.mutator.expire, self.target(), cutoff)
        assert (outcome.event_id is not None) == expires, (cutoff, keep, self.retained_from)
        self.commit(["VersionsExpired"] if expires else [], self.current)
        if expires:
            assert keep is not None
            self.retained_from = keep

    @rule(rows=st.lists(append_row, min_size=1, max_size=3))
    def append_to_neighbour(self, rows: list[dict[str, Any]]) -> None:
        """Events of another table interleave in the same stream: the time travel,
        expiry and restore of ``t`` must ignore them."""
        self.ingest(rows, "append", NEIGHBOUR)
        self.neighbour = canon([*(self.neighbour or []), *map(as_row, rows)])
        self.commit([], None)  # nothing of t

    @rule()
    def project(self) -> None:
        """Run the projector mid-way: a reader with no cache (snapshot + log tail) then
        sees the same table as the live one."""

        async def go() -> tuple[bytes, bytes]:
            await self.services.projector().run_until_caught_up()
            fresh = CatalogReader(self.services.log, self.services.store)
            a = await fresh.require_table(ORG, SUP, TABLE)
            b = await self.services.reader.require_table(ORG, SUP, TABLE)
            return encode_table(a), encode_table(b)

        a, b = self.run(go)
        assert a == b

    # -- checks after every step ---------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        if self.version < 0:
            return
        state = self.table()
        assert (state.version, state.retained_from) == (self.version, self.retained_from)
        assert self.run(query_rows, self.services) == self.current
        if self.neighbour is not None:
            assert self.run(query_rows, self.services, "", NEIGHBOUR) == self.neighbour
        self.check_past_version()

    def check_past_version(self) -> None:
        """A past version, by number or by instant, is the model's (or Gone)."""
        v = self.rnd.randint(0, self.version)
        if self.rnd.random() < 0.3:
            t = self.times[v] - timedelta(milliseconds=self.rnd.choice([0, 1]))
            at = f"AT (TIMESTAMP => '{t.isoformat()}')"
            seen = self.at_time(t)
        else:
            at, seen = f"AT (VERSION => {v})", v
        if seen is None:
            with pytest.raises(NotFound):
                self.run(query_rows, self.services, at)
        elif seen < self.retained_from:
            with pytest.raises(Gone):
                self.run(query_rows, self.services, at)
        else:
            got = self.run(query_rows, self.services, at)
            assert got == self.contents[seen], f"{at} (version {seen}): {got}"

    def teardown(self) -> None:
        try:
            if self.version >= 0:

                async def go() -> list[str]:
                    await self.services.projector().run_until_caught_up()
                    report = await replay(self.services.log, self.services.store, verify=True)
                    return report.differences

                assert self.run(go) == []
        finally:
            self._cm.__exit__(None, None, None)
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- the tests --------------------------------------------------------------------------

MODEL_SETTINGS = hypothesis.settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as p:
        yield p


@pytest.mark.parametrize("mode", list(MODES))
def test_table_matches_the_model(
    mode: str, settings: Settings, tmp_path: Path, portal: anyio.from_thread.BlockingPortal
) -> None:
    """Each example gets its own data directory and Redis key prefix."""
    base = msgspec.structs.replace(settings, **MODES[mode])
    run_state_machine_as_test(lambda: TableMachine(portal, base, tmp_path), settings=MODEL_SETTINGS)
