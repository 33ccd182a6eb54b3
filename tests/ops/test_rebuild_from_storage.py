"""``rebuild-from-storage`` (issue 8): Redis AND the event archive are lost; each table's
latest rows come back from its Delta mirror, else its Iceberg mirror, else (labelled
lossy) every data file it has. The history is gone, and the report says what is lossy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.rebuild import RebuildReport, rebuild_from_storage
from app.services import Services
from app.settings import Settings
from events.errors import InvalidInput
from tests.conftest import authed, start_redis
from tests.support.mirror_readers import sync

SALES = "/v1/acme/sales/tables"


def rows_of(c: TestClient[Any], table: str) -> list[Any]:
    r = c.post("/v1/acme/sales/query", json={"sql": f"select * from {table} order by all"})
    assert r.status_code == 200, r.text
    rows: list[Any] = r.json()["rows"]
    return rows


@pytest.mark.slow
def test_latest_rows_come_back_from_mirrors_and_data_files(
    settings: Settings, tmp_path: Path
) -> None:
    s = msgspec.structs.replace(settings, mirrors="delta,iceberg", archive=True)
    assert s.redis_url
    with authed(TestClient(create_app(s, s.redis_url, run_projector=False))) as c:

        def ok(r: Any) -> Any:
            assert r.status_code < 300, r.text
            return r.json()

        # Delta and Iceberg: a delete and an upsert, which the data files alone undo.
        ok(c.post(f"{SALES}/orders/rows", json=[{"id": i, "amount": i * 1.5} for i in range(6)]))
        ok(c.post(f"{SALES}/orders/delete", json={"keys": {"id": [1, 2]}}))
        ok(c.post(f"{SALES}/orders/rows?mode=upsert&key=id", json=[{"id": 3, "amount": 99.0}]))
        # Iceberg only.
        ok(c.post(f"{SALES}/iceberg_only/rows", json=[{"k": "a"}, {"k": "b"}]))
        ok(c.put(f"{SALES}/iceberg_only/mirrors", json={"formats": ["iceberg"]}))
        ok(c.post(f"{SALES}/iceberg_only/delete", json={"keys": {"k": ["a"]}}))
        # No mirror: append-only, so all its files are its latest rows.
        ok(c.post(f"{SALES}/plain/rows", json=[{"x": 1}]))
        ok(c.put(f"{SALES}/plain/mirrors", json={"formats": []}))
        ok(c.post(f"{SALES}/plain/rows", json=[{"x": 2}]))
        ok(c.post(f"{SALES}/stale/rows", json=[{"id": 1}]))
        sync(s)
        # A Delta runner that is down: only the Iceberg mirror sees the next write.
        ok(c.post(f"{SALES}/stale/rows", json=[{"id": 2}]))

        async def iceberg_only_runner() -> None:
            async with Services.open(s) as services:
                projector = services.projector()
                await projector.run_until_caught_up()
                await projector.release_all()
                runner = next(r for r in services.mirror_runners() if "iceberg" in r.group)
                await runner.run_until_caught_up()
                await runner.release_all()

        anyio.run(iceberg_only_runner)
        before = {t: rows_of(c, t) for t in ("orders", "iceberg_only", "plain", "stale")}

    # Both Redis and the archive are lost.
    (tmp_path / "redis2").mkdir()
    proc, url = start_redis(tmp_path / "redis2")
    try:
        fresh = msgspec.structs.replace(s, redis_url=url)

        async def run() -> RebuildReport:
            async with Services.open(fresh) as services:
                with pytest.raises(InvalidInput, match="recover"):  # the archive is better
                    await rebuild_from_storage(services)
                async for obj in services.storage.list_objects(".archive/"):
                    await services.storage.delete(obj.key)
                report = await rebuild_from_storage(services)
                with pytest.raises(InvalidInput, match="empty"):  # never over a live log
                    await rebuild_from_storage(services)
                return report

        report = anyio.run(run)
        sources = {t.table: t for t in report.tables}
        assert sources["acme/sales/orders"].source.startswith("delta mirror")
        assert sources["acme/sales/iceberg_only"].source.startswith("iceberg mirror")
        assert sources["acme/sales/plain"].source == "2 data files"
        assert "every version" in sources["acme/sales/plain"].lossy
        assert "inline" in sources["acme/sales/plain"].lossy
        assert "disagreed" not in sources["acme/sales/orders"].lossy
        # Regression (review): a lagging Delta mirror won over a current Iceberg one.
        assert sources["acme/sales/stale"].source.startswith("iceberg mirror")
        assert "disagreed" in sources["acme/sales/stale"].lossy
        with authed(TestClient(create_app(fresh, url, run_projector=False))) as c:
            for table, rows in before.items():
                assert rows_of(c, table) == rows, table
            # A new history starts: each table at its first write.
            assert c.get(f"{SALES}/orders").json()["version"] == 1
            assert (
                c.post(f"{SALES}/orders/rows", json=[{"id": 7, "amount": 1.0}]).json()["version"]
                == 2
            )
    finally:
        proc.terminate()
        proc.wait()
