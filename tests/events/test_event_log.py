"""The EventLog port on a real Redis: atomic versioned appends, idempotency, registry."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest

from app.services import Services
from events.errors import ConflictError, IdempotencyMismatch
from events.log import NEW_TABLE, Idempotency
from events.model import (
    DataFile,
    DataType,
    Field,
    OrgCreated,
    RowsAppended,
    SuperCreated,
    TableCreated,
    TableDropped,
)

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 1, 1, tzinfo=UTC)
base = {"org": "o", "super_": "s", "table": "t", "actor": "me", "time": T0}


def create(version: int = 0) -> TableCreated:
    return TableCreated(version=version, columns=(Field("x", DataType(kind="int64")),), **base)


def append(version: int, rows: int = 1) -> RowsAppended:
    f = DataFile(path=f"p{version}", rows=rows, size_bytes=1)
    return RowsAppended(version=version, files=(f,), rows=rows, **base)


async def test_append_checks_and_bumps_the_version(services: Services) -> None:
    log = services.log
    first = await log.append("o", "s", "t", [create(), append(1)], expected_version=NEW_TABLE)
    assert first.version == 1
    assert len(first.event_ids) == 2
    with pytest.raises(ConflictError) as err:
        await log.append("o", "s", "t", [append(1)], expected_version=0)
    assert err.value.current_version == 1
    with pytest.raises(ConflictError):  # the table exists already
        await log.append("o", "s", "t", [create()], expected_version=NEW_TABLE)
    second = await log.append("o", "s", "t", [append(2)], expected_version=1)
    assert second.version == 2
    events = await log.read("o", "s")
    assert [e.id for e in events] == [*first.event_ids, *second.event_ids]
    assert [e.version for e in events] == [0, 1, 2]
    assert [e.id for e in await log.read("o", "s", after=first.event_ids[0])] == [
        first.event_ids[1],
        second.event_ids[0],
    ]


async def test_a_dropped_names_versions_go_on(services: Services) -> None:
    """After a drop, a create under the name continues its versions, and nothing
    prepared against the old table (an expected version it had) lands on the new one."""
    log = services.log
    await log.append("o", "s", "t", [create(), append(1)], expected_version=NEW_TABLE)
    dropped = await log.append(
        "o", "s", "t", [TableDropped(version=2, rows=1, **base)], expected_version=1
    )
    assert dropped.version == 2
    with pytest.raises(ConflictError) as err:  # the table is gone
        await log.append("o", "s", "t", [append(2)], expected_version=1)
    assert err.value.current_version == NEW_TABLE
    # A create numbers its events from 0; the log shifts them past the dropped table's.
    again = await log.append("o", "s", "t", [create(), append(1)], expected_version=NEW_TABLE)
    assert again.version == 4
    assert [e.version for e in await log.read("o", "s")] == [0, 1, 2, 3, 4]
    for stale in (1, 2, 3):  # versions the old table had, or the new one had before
        with pytest.raises(ConflictError):
            await log.append("o", "s", "t", [append(stale + 1)], expected_version=stale)
    with pytest.raises(ConflictError):  # it exists again
        await log.append("o", "s", "t", [create()], expected_version=NEW_TABLE)
    assert (await log.append("o", "s", "t", [append(5)], expected_version=4)).version == 5


async def test_a_failed_append_writes_nothing(services: Services) -> None:
    await services.log.append("o", "s", "t", [create()], expected_version=NEW_TABLE)
    with pytest.raises(ConflictError):
        await services.log.append("o", "s", "t", [append(5), append(6)], expected_version=4)
    assert len(await services.log.read("o", "s")) == 1


async def test_concurrent_appends_with_the_same_expected_version_one_wins(
    services: Services,
) -> None:
    await services.log.append("o", "s", "t", [create()], expected_version=NEW_TABLE)
    outcomes: list[str] = []

    async def attempt() -> None:
        try:
            await services.log.append("o", "s", "t", [append(1)], expected_version=0)
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(attempt)
    assert sorted(outcomes) == ["conflict"] * 9 + ["ok"]


async def test_idempotency_key_replays_and_detects_reuse(services: Services) -> None:
    log = services.log
    await log.append("o", "s", "t", [create()], expected_version=NEW_TABLE)
    key = Idempotency(key="k1", fingerprint="fp-a", result=b'{"rows":1}')
    first = await log.append("o", "s", "t", [append(1)], expected_version=0, idempotency=key)
    assert not first.replayed
    # a retry, even with a stale expected version, returns the first result
    again = await log.append("o", "s", "t", [append(1)], expected_version=0, idempotency=key)
    assert again.replayed
    assert (again.version, again.event_ids, again.result) == (1, first.event_ids, b'{"rows":1}')
    assert len(await log.read("o", "s")) == 2
    stored = await log.stored_result("o", "s", "k1")
    assert stored is not None and stored.fingerprint == "fp-a"
    other = Idempotency(key="k1", fingerprint="fp-b")
    with pytest.raises(IdempotencyMismatch):
        await log.append("o", "s", "t", [append(2)], expected_version=1, idempotency=other)
    assert len(await log.read("o", "s")) == 2


async def test_registry_records_orgs_and_supers_once(services: Services) -> None:
    log = services.log
    reg = {"actor": "me", "time": T0}
    for sup in ("s", "s", "s2"):
        await log.ensure_super(
            "o",
            sup,
            OrgCreated(org="o", super_=sup, **reg),
            SuperCreated(org="o", super_=sup, **reg),
        )
    events = await log.read_registry()
    assert [(type(e).__name__, e.super_) for e in events] == [
        ("OrgCreated", "s"),
        ("SuperCreated", "s"),
        ("SuperCreated", "s2"),
    ]


async def test_every_key_of_a_super_shares_one_hash_tag(services: Services) -> None:
    k = services.keys
    tags = {
        key[key.index("{") : key.index("}") + 1]
        for key in (
            k.stream("o", "s"), k.versions("o", "s"), k.idempotency("o", "s", "x"),
            k.snapshot("o", "s"), k.checkpoint("o", "s", "catalog"), k.lease("o", "s", "catalog"),
        )
    }  # fmt: skip
    assert tags == {"{o/s}"}
