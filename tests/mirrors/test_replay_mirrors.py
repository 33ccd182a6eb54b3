"""`ledgerlake replay --mirrors` (Services.reset_mirrors): the runners forget what the
mirrors reflect and publish every table again, without duplicating a Delta commit."""

from __future__ import annotations

import anyio
from deltalake import DeltaTable
from pyiceberg.table import StaticTable

from app.services import Services
from tests.support.lake import append, ok, table_url
from tests.support.mirror_lake import Lake


def _reset(lake: Lake) -> int:
    async def run() -> int:
        async with Services.open(lake.settings) as services:
            return await services.reset_mirrors()

    return anyio.run(run)


def test_reset_mirrors_republishes_every_table_once(local_lake: Lake) -> None:
    append(local_lake.client, [{"id": 1}, {"id": 2}])
    append(local_lake.client, [{"id": 3}], table="other")
    local_lake.sync()
    root = local_lake.settings.data_dir / "files" / "acme" / "sales"
    delta_versions = {t: DeltaTable(str(root / t)).version() for t in ("orders", "other")}
    before = ok(local_lake.client.get(table_url()))["mirrors"][1]["metadata_location"]

    assert _reset(local_lake) == 1
    detail = ok(local_lake.client.get(table_url()))
    assert [m["version"] for m in detail["mirrors"]] == [None, None]
    local_lake.sync()

    detail = ok(local_lake.client.get(table_url()))
    assert [m["version"] for m in detail["mirrors"]] == [1, 1]
    # Delta already held that version: no second commit of it.
    assert {t: DeltaTable(str(root / t)).version() for t in delta_versions} == delta_versions
    # Iceberg is published again from scratch, with the same rows.
    after = detail["mirrors"][1]["metadata_location"]
    assert after != before
    rows = StaticTable.from_metadata(after).scan().to_arrow().column("id").to_pylist()
    assert sorted(rows) == [1, 2]
