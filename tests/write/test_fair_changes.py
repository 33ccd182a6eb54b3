"""Fairness: concurrent upserts of disjoint keys on one table are never refused.

Sixteen writers, in one process or spread over two (two ``Services`` on one Redis and
one storage, as two API processes), upsert disjoint keys of one table while readers
query it. Each change updates its writer's group of keys to the change's round and
inserts one new key; so in every committed version a group's keys share one value,
and a writer's inserted keys number exactly that value: a reader that saw half a
change would see a group split, or a count that does not match.

What must hold: no change is refused (the retries are the product's defaults), the
final rows are exactly the model's, and every read matches a whole committed version.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from app.services import Services
from app.settings import Settings
from app.write.changes.commit import Target
from app.write.changes.mutator import Mutator
from tests.write.test_mutation_races import (
    DEADLINE_S,
    ORG,
    SUP,
    GatedMutator,
    Row,
    T,
    append,
    assert_no_orphans,
    read_current,
    rows_at,
    source,
)

pytestmark = pytest.mark.anyio

WRITERS, ROUNDS, GROUP = 16, 8, 4
SEED_FILES, SEED_ROWS = 10, 1_000
NEW = 100_000  # inserted keys: NEW + writer * 1000 + round


def group(w: int) -> list[int]:
    """The seeded keys writer ``w`` updates: spread over every seed file (key k is in
    file k % SEED_FILES), so that writers share files but never keys."""
    return [w + WRITERS * j for j in range(GROUP)]


def check_version(rows: list[Row]) -> None:
    """A committed version's invariants (see the module docstring)."""
    ids = Counter(r[0] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == [], "a key twice"
    values = {int(r[0]): int(r[1]) for r in rows}
    for w in range(WRITERS):
        seen = {values[k] for k in group(w)}
        assert len(seen) == 1, f"writer {w}'s group split: half a change"
        inserted = sum(1 for k in values if NEW + w * 1000 <= k < NEW + (w + 1) * 1000)
        assert inserted == seen.pop(), f"writer {w}: its inserts and updates disagree"


@pytest.fixture
async def processes(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[list[Services]]:
    # The product's own retry budget: fairness must not need a larger one.
    defaults = Settings()
    fair = msgspec.structs.replace(
        settings, merge_retries=defaults.merge_retries, write_retries=defaults.write_retries
    )
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Services.open(fair, fair.redis_url))
            for _ in range(request.param)
        ]


@pytest.mark.parametrize("processes", [1, 2], indirect=True, ids=["one-process", "two-processes"])
async def test_sixteen_writers_of_disjoint_keys_are_never_refused(
    processes: list[Services], tmp_path: Path
) -> None:
    per = SEED_ROWS // SEED_FILES
    for f in range(SEED_FILES):
        rows = [{"id": k, "v": 0} for k in range(SEED_ROWS) if k % SEED_FILES == f]
        assert len(rows) == per
        await append(processes[0], tmp_path, rows)
    first = (await read_current(processes[0]))[0]
    refused: list[BaseException] = []
    reads: list[tuple[int, list[Row]]] = []
    done = anyio.Event()

    async def writer(w: int) -> None:
        services = processes[w % len(processes)]
        for r in range(1, ROUNDS + 1):
            rows: list[dict[str, Any]] = [{"id": k, "v": r} for k in group(w)]
            rows.append({"id": NEW + w * 1000 + r, "v": r})
            try:
                outcome = await services.mutator.upsert(
                    Target(ORG, SUP, T), source(tmp_path, rows), ["id"]
                )
            except Exception as exc:
                refused.append(exc)
                return
            assert outcome.result["updated"] == GROUP and outcome.result["inserted"] == 1

    async def reader(n: int) -> None:
        services = processes[n % len(processes)]
        while not done.is_set():
            version, rows = await read_current(services)
            check_version(rows)
            reads.append((version, rows))
            await anyio.lowlevel.checkpoint()

    async def writers() -> None:
        try:
            async with anyio.create_task_group() as tg:
                for w in range(WRITERS):
                    tg.start_soon(writer, w)
        finally:
            done.set()

    with anyio.fail_after(DEADLINE_S * 4):
        async with anyio.create_task_group() as tg:
            for n in range(2):
                tg.start_soon(reader, n)
            tg.start_soon(writers)

    assert refused == []
    version, rows = await read_current(processes[-1])
    assert version == first + WRITERS * ROUNDS
    expected = {k: 0 for k in range(SEED_ROWS)}
    for w in range(WRITERS):
        expected.update({k: ROUNDS for k in group(w)})
        expected.update({NEW + w * 1000 + r: r for r in range(1, ROUNDS + 1)})
    assert {int(r[0]): int(r[1]) for r in rows} == expected
    by_version: dict[int, list[list[Row]]] = defaultdict(list)
    for v, seen in reads:
        by_version[v].append(seen)
    assert len(by_version) > 1, "the reads never overlapped a write"
    for v, seens in by_version.items():
        committed = await rows_at(processes[0], v)
        assert all(seen == committed for seen in seens), f"a read of v{v} was no version"
    await assert_no_orphans(processes[0])


# -- rebasing deletion vectors across processes -----------------------------------------

SEED = {i: 0 for i in range(8)}  # one file: id i is row i


@pytest.fixture
async def elsewhere(services: Services) -> AsyncIterator[Services]:
    """Another API process on the same Redis and storage."""
    async with Services.open(services.settings, services.settings.redis_url) as other:
        yield other


@pytest.mark.parametrize(
    ("ours", "theirs", "rebased", "expected"),
    [
        # Disjoint rows of one file: our positions join the deletion vector theirs grew.
        ("upsert 0", "upsert 1", True, {**SEED, 0: 9, 1: 7}),
        ("upsert 0", "delete 1", True, {**{k: v for k, v in SEED.items() if k != 1}, 0: 9}),
        ("delete 3", "delete 2", True, {k: v for k, v in SEED.items() if k not in (2, 3)}),
        ("delete 3", "upsert 1", True, {**{k: v for k, v in SEED.items() if k != 3}, 1: 7}),
        # The same row: it is gone from under ours, which computes again.
        ("upsert 0", "delete 0", False, {**SEED, 0: 9}),  # now an insert
        ("delete 3", "upsert 3", False, {k: v for k, v in SEED.items() if k != 3}),
    ],
)
async def test_changes_of_disjoint_rows_of_one_file_rebase_their_deletion_vectors(
    services: Services,
    elsewhere: Services,
    tmp_path: Path,
    ours: str,
    theirs: str,
    rebased: bool,
    expected: dict[int, int],
) -> None:
    await append(services, tmp_path, [{"id": k, "v": v} for k, v in SEED.items()])

    async def change(services: Services, mutator: Mutator, what: str, value: int) -> None:
        op, key = what.split()
        target = Target(ORG, SUP, T)
        if op == "upsert":
            rows = [{"id": int(key), "v": value}]
            await mutator.upsert(target, source(tmp_path, rows), ["id"])
        else:
            await mutator.delete(target, keys={"id": [int(key)]})

    mutator = GatedMutator(
        services, lambda: change(elsewhere, elsewhere.mutator, theirs, 7), retries=1
    )
    await change(services, mutator, ours, 9)

    assert len(mutator.outputs) == (1 if rebased else 2)
    _, rows = await read_current(services)
    assert {int(r[0]): int(r[1]) for r in rows} == expected
    assert {int(r[0]): int(r[1]) for r in (await read_current(elsewhere))[1]} == expected
    (seed_file,) = [
        f for f in (await services.reader.super_state(ORG, SUP)).tables[T].files if f.rows == 8
    ]
    assert seed_file.deleted is not None
    assert seed_file.live_rows == len([k for k in SEED if k in expected and expected[k] == SEED[k]])
    await assert_no_orphans(services)
