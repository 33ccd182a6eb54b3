"""The query concurrency limit holds even for queries abandoned after their timeout."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from events.errors import QueryTimeout, Unavailable
from projections.catalog import SuperState
from projections.query.engine import QueryEngine
from projections.query.types import QueryLimits

pytestmark = pytest.mark.anyio

# list_sort does not check for interrupts: this runs on for a second or more after one.
STUBBORN = "select len(list_sort(range(4000000)))"


@pytest.mark.slow
async def test_an_abandoned_query_keeps_its_slot_until_it_ends(tmp_path: Path) -> None:
    limits = QueryLimits(concurrency=1, grace_s=0.1, threads=1)
    engine = QueryEngine(lambda key: key, limits, tmp_path)
    empty = SuperState(org="o", name="s")
    with pytest.raises(QueryTimeout, match="abandoned"):
        await engine.run(empty, STUBBORN, timeout_s=0.1)
    # The abandoned engine still runs: a second query must not start beside it.
    with pytest.raises(Unavailable) as busy:
        await engine.run(empty, "select 1", timeout_s=0.2)
    assert busy.value.code == "query_busy"
    # Once it has ended, the slot is free again.
    with anyio.fail_after(60):
        while True:
            try:
                got = await engine.run(empty, "select 42 as x", timeout_s=1)
                break
            except Unavailable:
                continue
    assert got.table.to_pylist() == [{"x": 42}]
