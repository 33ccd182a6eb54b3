"""Disaster recovery (issue 8): a mixed workload, then Redis is thrown away entirely (a
new, empty redis-server), ``recover`` rebuilds it from the event archive, and the
catalog, query results, history, principals, audit and mirrors are what they were;
``replay --verify`` passes and writes go on with the right versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.ops.recover import NotEmpty, recover
from app.services import Services
from app.settings import Settings
from projections.replay import replay
from tests.conftest import authed, start_redis
from tests.support.mirror_readers import (
    Storage,
    mirror_of,
    read_deltalake,
    read_pyiceberg,
    sync,
)

SALES = "/v1/acme/sales/tables"
IDEMPOTENT = [{"id": 77, "amount": 7.0}]
TABLES = ("orders", "people", "gone")


def workload(c: TestClient[Any]) -> str:
    """Appends, schema evolution, an upsert, a delete, an overwrite, a restore, a drop
    and a re-create, policies, a principal with a grant and a token, a query. Returns
    the principal's token."""

    def ok(r: Any) -> Any:
        assert r.status_code < 300, r.text
        return r.json()

    ok(c.post(f"{SALES}/orders/rows", json=[{"id": i, "amount": i * 1.5} for i in range(5)]))
    ok(c.post(f"{SALES}/orders/rows", json=[{"id": 9, "amount": 2.0, "note": "new column"}]))
    ok(c.post(f"{SALES}/orders/rows?mode=upsert&key=id", json=[{"id": 1, "amount": 100.0}]))
    ok(c.post(f"{SALES}/orders/delete", json={"keys": {"id": [2]}}))
    ok(c.post(f"{SALES}/people/rows", json=[{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]))
    ok(c.post(f"{SALES}/people/rows?mode=overwrite", json=[{"id": 3, "region": "eu"}]))
    ok(c.post(f"{SALES}/people/restore", json={"version": 1}))
    ok(c.put(f"{SALES}/people/policies", json={"policies": [
        {"role": "reader", "row_filter": "region = :principal.region"}]}))  # fmt: skip
    ok(c.post(f"{SALES}/gone/rows", json=[{"x": 1}]))
    ok(c.delete(f"{SALES}/gone"))
    ok(c.post(f"{SALES}/gone/rows", json=[{"y": "again"}]))
    pid = ok(c.post("/v1/principals", json={"name": "eu", "org": "acme",
                                            "attributes": {"region": "eu"}}))["id"]  # fmt: skip
    ok(c.post("/v1/grants", json={"principal_id": pid, "role": "reader", "org": "acme"}))
    token: str = ok(c.post(f"/v1/principals/{pid}/tokens", json={}))["token"]
    ok(c.post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"}))
    ok(c.post(f"{SALES}/orders/rows", json=IDEMPOTENT, headers={"Idempotency-Key": "k-1"}))
    return token


def observe(c: TestClient[Any], reader: str, storage: Storage) -> dict[str, Any]:
    """Everything a user can see of the lake (mirror publish times aside)."""
    out: dict[str, Any] = {}
    for table in TABLES:
        detail = c.get(f"{SALES}/{table}").json()
        mirrors = detail.pop("mirrors")
        out[f"{table} detail"] = detail
        out[f"{table} rows"] = c.post(
            "/v1/acme/sales/query", json={"sql": f"select * from {table} order by all"}
        ).json()["rows"]
        out[f"{table} history"] = c.get(f"{SALES}/{table}/history").json()["entries"]
        out[f"{table} mirror versions"] = [(m["format"], m["version"]) for m in mirrors]
        for fmt, read in (("delta", read_deltalake), ("iceberg", read_pyiceberg)):
            columns, rows = read(mirror_of(c, storage, "sales", table, fmt))
            key = sorted(columns)
            out[f"{table} {fmt}"] = sorted(
                tuple(str(r[k]) for k in key) for r in rows
            )  # fmt: skip
    out["events"] = c.get("/v1/events", params={"org": "acme", "limit": 1000}).json()["events"]
    out["principals"] = c.get("/v1/principals").json()
    queries = c.get("/v1/audit", params={"org": "acme", "kind": "query"}).json()["entries"]
    out["audited queries"] = [(q["sql"], q["rows"]) for q in queries]
    out["reader sees"] = c.post(
        "/v1/acme/sales/query", json={"sql": "select id from people order by id"},
        headers={"Authorization": f"Bearer {reader}"},
    ).json()["rows"]  # fmt: skip
    return out


@pytest.mark.slow
def test_a_lost_redis_is_recovered_from_the_archive(settings: Settings, tmp_path: Path) -> None:
    s = msgspec.structs.replace(settings, mirrors="delta,iceberg", archive=True)
    assert s.redis_url
    storage = Storage(s)
    with authed(TestClient(create_app(s, s.redis_url, run_projector=False))) as c:
        reader = workload(c)
        sync(s)
        before = observe(c, reader, storage)
        assert before["reader sees"] == [[1]]  # people at version 1, the eu rows only
        assert before["audited queries"] and len(before["events"]) > 15
        versions = {t: c.get(f"{SALES}/{t}").json()["version"] for t in TABLES}

    # Redis is gone: a new, empty server; the storage (data files and archive) remains.
    (tmp_path / "redis2").mkdir()
    proc, url = start_redis(tmp_path / "redis2")
    try:
        fresh = msgspec.structs.replace(s, redis_url=url)

        async def run_recover() -> list[str]:
            async with Services.open(fresh) as services:
                report = await recover(services)
                assert report.supers == ["acme/sales"]
                with pytest.raises(NotEmpty):  # never over a live log
                    await recover(services)
                return (await replay(services.log, services.store, verify=True)).differences

        assert anyio.run(run_recover) == []  # replay --verify passes
        sync(fresh)  # the mirror runners publish every table again
        with authed(TestClient(create_app(fresh, url, run_projector=False))) as c:
            after = observe(c, reader, storage)
            for key in before:
                assert after[key] == before[key], key
            # A client retrying its write after the recovery gets the first answer.
            retry = c.post(
                f"{SALES}/orders/rows", json=IDEMPOTENT, headers={"Idempotency-Key": "k-1"}
            )
            assert retry.json()["replayed"] is True
            assert retry.json()["version"] == versions["orders"]
            reused = c.post(
                f"{SALES}/orders/rows", json=[{"id": 1}], headers={"Idempotency-Key": "k-1"}
            )
            assert reused.status_code == 422  # the same key for another body, as before
            # Writes go on, with the versions the lost Redis would have given.
            r = c.post(f"{SALES}/orders/rows", json=[{"id": 50, "amount": 1.0}])
            assert r.json()["version"] == versions["orders"] + 1
            stale = c.post(
                f"{SALES}/people/rows", json=[{"id": 7, "region": "eu"}],
                headers={"If-Match": str(versions["people"] - 1)},
            )  # fmt: skip
            assert stale.status_code == 409
            assert c.post(f"{SALES}/gone/rows", json=[{"y": "more"}]).json()["version"] == (
                versions["gone"] + 1
            )
            # The org and super exist once: a new table in them makes no second copy.
            c.post("/v1/acme/sales/tables/extra/rows", json=[{"z": 1}])
            assert [o["name"] for o in c.get("/v1/orgs").json()["orgs"]] == ["acme"]
    finally:
        proc.terminate()
        proc.wait()


def test_a_mirror_ahead_of_the_recovered_log_starts_over(
    settings: Settings, tmp_path: Path
) -> None:
    """Regression (review): a write acknowledged and mirrored but not yet archived is
    lost by a recovery (the documented window); the Delta mirror kept serving it and
    its status said it was current. A mirror ahead of the log now starts over."""
    from deltalake import DeltaTable

    s = msgspec.structs.replace(settings, mirrors="delta", archive=True)
    assert s.redis_url
    storage = Storage(s)
    rows = "/v1/acme/sales/tables/orders/rows"
    with authed(TestClient(create_app(s, s.redis_url, run_projector=False))) as c:
        assert c.post(rows, json=[{"id": 1}, {"id": 2}]).status_code == 200
        sync(s)  # projected, mirrored and archived
        assert c.post(rows, json=[{"id": 100}]).status_code == 200

    async def project_only() -> None:  # mirrored, not archived yet
        async with Services.open(msgspec.structs.replace(s, archive=False)) as services:
            await services.catch_up()

    anyio.run(project_only)

    def delta_ids() -> list[int]:
        table = DeltaTable(storage.uri("acme/sales/orders")).to_pyarrow_table()
        return sorted(table.column("id").to_pylist())

    assert delta_ids() == [1, 2, 100]
    (tmp_path / "redis2").mkdir()
    proc, url = start_redis(tmp_path / "redis2")
    try:
        fresh = msgspec.structs.replace(s, redis_url=url)

        async def run_recover() -> None:
            async with Services.open(fresh) as services:
                await recover(services)

        anyio.run(run_recover)
        sync(fresh)
        with authed(TestClient(create_app(fresh, url, run_projector=False))) as c:
            got = c.post("/v1/acme/sales/query", json={"sql": "select id from orders order by id"})
            assert got.json()["rows"] == [[1], [2]]
            mirror = mirror_of(c, storage, "sales", "orders", "delta")
            assert mirror.version == 1
        assert delta_ids() == [1, 2]
    finally:
        proc.terminate()
        proc.wait()
