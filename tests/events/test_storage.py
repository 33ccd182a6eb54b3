"""One contract for every storage backend: local disk and S3 (a real server)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.services import open_storage
from app.settings import Settings
from events.storage.port import Storage
from tests.conftest import authed

pytestmark = pytest.mark.anyio


@pytest.fixture
async def storage(any_settings: Settings) -> AsyncIterator[Storage]:
    store = open_storage(any_settings)
    await store.start()
    yield store
    await store.close()


def staged(storage: Storage, data: bytes) -> Any:
    path = storage.staging_file(".bin")
    path.write_bytes(data)
    return path


async def test_publish_exists_list_delete(storage: Storage) -> None:
    key = "o/s/t/data/a.parquet"
    assert not await storage.exists(key)
    size = await storage.publish(staged(storage, b"hello"), key)
    assert size == 5
    assert await storage.exists(key)
    listed = [obj async for obj in storage.list_objects("o/s/t/")]
    assert [(o.key, o.size) for o in listed] == [(key, 5)]
    assert listed[0].modified.tzinfo is not None
    assert await storage.read(key) == b"hello"
    await storage.publish(staged(storage, b"replaced"), key)  # a publish replaces
    assert await storage.read(key) == b"replaced"
    await storage.delete(key)
    assert not await storage.exists(key)
    assert await storage.read(key) is None
    await storage.delete(key)  # deleting what is gone is fine


async def test_large_files_round_trip_through_multipart(storage: Storage) -> None:
    data = os.urandom(12 * 1024 * 1024 + 123)  # above the 5 MiB part size on S3
    key = "o/s/t/data/big.bin"
    assert await storage.publish(staged(storage, data), key) == len(data)
    listed = [obj async for obj in storage.list_objects("o/s/t/data/")]
    assert [(o.key, o.size) for o in listed] == [(key, len(data))]


async def test_keys_cannot_escape_the_root(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.publish(staged(storage, b"x"), "../outside.parquet")


ROWS = [{"id": i, "name": f"n{i}", "amount": i * 1.5} for i in range(1, 2001)]
QUERIES = [
    "select count(*), sum(amount), min(name), max(id) from orders",
    "select id, name from orders where id in (3, 1999) order by id",
    "select o.id, p.tag from orders o join tags p on p.id = o.id order by o.id",
]


def test_ingest_and_queries_give_the_same_results_on_every_backend(
    any_settings: Settings, settings: Settings
) -> None:
    def results(s: Settings) -> list[Any]:
        assert s.redis_url
        with authed(TestClient(create_app(s, s.redis_url))) as c:
            assert c.post("/v1/a/b/tables/orders/rows", json=ROWS[:1000]).status_code == 200
            assert c.post("/v1/a/b/tables/orders/rows", json=ROWS[1000:]).status_code == 200
            tags = [{"id": 3, "tag": "x"}, {"id": 1999, "tag": "y"}]
            assert c.post("/v1/a/b/tables/tags/rows", json=tags).status_code == 200
            out = []
            for sql in QUERIES:
                r = c.post("/v1/a/b/query", json={"sql": sql})
                assert r.status_code == 200, r.text
                out.append(r.json()["rows"])
            return out

    expected = [
        [[2000, sum(r["amount"] for r in ROWS), "n1", 2000]],
        [[3, "n3"], [1999, "n1999"]],
        [[3, "x"], [1999, "y"]],
    ]
    assert results(any_settings) == expected


def test_object_store_failing_mid_upload_is_503_and_appends_nothing(
    settings: Settings, s3_server: Any
) -> None:
    import uuid as _uuid

    import msgspec
    import pyarrow as pa

    from tests.support.bodies import parquet_bytes
    from tests.support.faultproxy import CuttingProxy

    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    bucket = f"ll-{_uuid.uuid4().hex[:12]}"
    with CuttingProxy(host, int(port)).running() as proxy:
        s3 = msgspec.structs.replace(
            settings,
            storage_url=f"s3://{bucket}/p",
            s3_endpoint_url=f"http://127.0.0.1:{proxy.port}",
            s3_access_key_id=s3_server.access_key,
            s3_secret_access_key=s3_server.secret_key,
            s3_part_size=5 * 1024 * 1024,
            s3_max_attempts=2,
        )
        assert s3.redis_url
        # ~12 MiB of incompressible Parquet: a multipart upload of three parts
        table = pa.table({"blob": pa.array([os.urandom(2 * 1024 * 1024) for _ in range(6)])})
        body = parquet_bytes(table)
        with authed(TestClient(create_app(s3, s3.redis_url))) as c:
            ok = c.post(
                "/v1/a/b/tables/t/rows",
                content=parquet_bytes(pa.table({"blob": pa.array([b"small"])})),
                headers={"content-type": "application/vnd.apache.parquet"},
            )
            assert ok.status_code == 200, ok.text
            before = c.get("/v1/events?org=a&super=b").json()["events"]
            proxy.cut_after(7 * 1024 * 1024)  # dies during the second part
            r = c.post(
                "/v1/a/b/tables/t/rows",
                content=body,
                headers={"content-type": "application/vnd.apache.parquet"},
            )
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "storage_unavailable"
            assert "object storage failed" in error["message"]
            assert r.headers["retry-after"]
            assert c.get("/v1/events?org=a&super=b").json()["events"] == before
    direct = s3_server.client()
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 1  # only the small first file: nothing half-written is visible


def test_queries_use_the_credentials_boto_resolved(
    settings: Settings, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No static keys in the settings: boto's credential chain (here, the environment)
    finds them, and DuckDB's secret is built from what it found."""
    import uuid as _uuid

    import msgspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    chained = msgspec.structs.replace(
        settings,
        storage_url=f"s3://ll-{_uuid.uuid4().hex[:12]}/p",
        s3_endpoint_url=s3_server.endpoint,
    )
    assert chained.redis_url and chained.s3_access_key_id is None
    with authed(TestClient(create_app(chained, chained.redis_url))) as c:
        assert c.post("/v1/a/b/tables/t/rows", json=[{"x": 41}, {"x": 1}]).status_code == 200
        r = c.post("/v1/a/b/query", json={"sql": "select sum(x) from t"})
        assert r.status_code == 200, r.text
        assert r.json()["rows"] == [[42]]
