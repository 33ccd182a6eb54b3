"""Catalog reads, history, the audit log, health and the OpenAPI schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed


def put(client: TestClient[Any], path: str, rows: list[dict[str, Any]], **kw: Any) -> Any:
    r = client.post(f"/v1/{path}/rows", json=rows, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_listings_and_table_detail(client: TestClient[Any]) -> None:
    put(client, "acme/sales/tables/orders", [{"id": 1, "amount": 5.5}, {"id": 7, "amount": None}])
    put(client, "acme/sales/tables/orders", [{"id": 3, "amount": 1.0}])
    put(client, "acme/sales/tables/refunds", [{"id": 1}])
    put(client, "acme/hr/tables/people", [{"name": "x"}])
    put(client, "zeta/ops/tables/runs", [{"n": 1}])

    orgs = client.get("/v1/orgs").json()["orgs"]
    assert [(o["name"], o["supers"]) for o in orgs] == [("acme", 2), ("zeta", 1)]
    supers = client.get("/v1/acme/supers").json()["supers"]
    assert [(s["name"], s["tables"]) for s in supers] == [("hr", 1), ("sales", 2)]
    tables = client.get("/v1/acme/sales/tables").json()["tables"]
    assert [(t["name"], t["version"], t["row_count"], t["file_count"]) for t in tables] == [
        ("orders", 2, 3, 2),
        ("refunds", 1, 1, 1),
    ]
    d = client.get("/v1/acme/sales/tables/orders").json()
    assert (d["version"], d["row_count"], d["file_count"]) == (2, 3, 2)
    assert d["size_bytes"] > 0
    assert d["stats"]["id"] == {"null_count": 0, "min": 1, "max": 7}
    assert d["stats"]["amount"] == {"null_count": 1, "min": 1.0, "max": 5.5}
    assert d["created_at"] <= d["updated_at"]
    assert d["created_by"] == "api-token"


def test_history_has_one_entry_per_version_and_pages(client: TestClient[Any]) -> None:
    ids = [put(client, "acme/sales/tables/t", [{"x": i}])["event_id"] for i in range(4)]
    put(client, "acme/sales/tables/other", [{"y": 1}])  # not in t's history
    entries = client.get("/v1/acme/sales/tables/t/history").json()["entries"]
    assert [e["version"] for e in entries] == [0, 1, 2, 3, 4]
    assert [e["event_id"] for e in entries[1:]] == ids
    assert all(e["rows_added"] == 1 for e in entries[1:])
    assert all(e["actor"] == "api-token" and e["request_id"] for e in entries)
    page = client.get("/v1/acme/sales/tables/t/history?limit=2").json()
    assert [e["version"] for e in page["entries"]] == [0, 1]
    rest = client.get(f"/v1/acme/sales/tables/t/history?after={page['next_after']}").json()
    assert [e["version"] for e in rest["entries"]] == [2, 3, 4]
    assert rest["next_after"] is None


def test_request_id_is_recorded_in_events(client: TestClient[Any]) -> None:
    r = client.post("/v1/a/b/tables/t/rows", json=[{"x": 1}], headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    events = client.get("/v1/events?org=a&super=b").json()["events"]
    assert {e["request_id"] for e in events} == {"abc-123"}
    # an unsafe incoming id is replaced by a generated one
    r = client.get("/health", headers={"X-Request-ID": "bad id\n"})
    assert r.headers["x-request-id"] != "bad id\n" and len(r.headers["x-request-id"]) == 32


def test_events_api_reads_streams_with_filters_and_cursor(client: TestClient[Any]) -> None:
    put(client, "acme/sales/tables/t", [{"x": 1}])
    put(client, "acme/sales/tables/u", [{"x": 1}])
    put(client, "acme/hr/tables/p", [{"x": 1}])
    everything = client.get("/v1/events?org=acme").json()
    types = [e["type"] for e in everything["events"]]
    assert types.count("OrgCreated") == 1 and types.count("SuperCreated") == 2
    assert types.count("TableCreated") == 3 and types.count("RowsAppended") == 3
    ids = [e["id"] for e in everything["events"]]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    only_t = client.get("/v1/events?org=acme&super=sales&table=t").json()["events"]
    assert {e["table"] for e in only_t} == {"t"} and len(only_t) == 2
    first = client.get("/v1/events?org=acme&super=sales&limit=1").json()
    second = client.get(f"/v1/events?org=acme&super=sales&after={first['next_after']}").json()
    assert [e["id"] for e in first["events"] + second["events"]] == [
        e["id"] for e in client.get("/v1/events?org=acme&super=sales").json()["events"]
    ]
    event = only_t[1]
    assert event["files"][0]["rows"] == 1 and event["version"] == 1
    assert client.get("/v1/events?org=nope").status_code == 404
    assert client.get("/v1/events?org=acme&after=yesterday").status_code == 400
    assert client.get("/v1/events?org=acme&limit=0").status_code == 400


def test_health_reports_redis_and_projection_lag(settings: Settings) -> None:
    assert settings.redis_url
    # no projector in this instance: the lag must show the unprojected events
    with authed(TestClient(create_app(settings, settings.redis_url, run_projector=False))) as c:
        c.post("/v1/a/b/tables/t/rows", json=[{"x": 1}])
        body = c.get("/health").json()
        assert body["status"] == "ok" and body["redis"]["ok"] is True
        lag = body["projections"]["catalog"]
        assert lag["lag_events"] == 4  # OrgCreated, SuperCreated, TableCreated, RowsAppended
        assert lag["lag_seconds"] >= 0


def test_health_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    with authed(
        TestClient(create_app(settings, "redis://127.0.0.1:1/0", run_projector=False))
    ) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "degraded"
        w = c.post("/v1/a/b/tables/t/rows", json=[{"x": 1}])
        assert w.status_code == 503
        assert w.json()["error"]["code"] == "unavailable"


def test_openapi_schema_lists_the_api(client: TestClient[Any]) -> None:
    schema = client.get("/schema/openapi.json").json()
    paths = schema["paths"]
    assert {"/health", "/v1/orgs", "/v1/events", "/v1/{org}/{super}/query"} <= set(paths)
    ingest = paths["/v1/{org}/{super}/tables/{table}/rows"]["post"]
    headers = {p["name"] for p in ingest["parameters"] if p["in"] == "header"}
    assert {"If-Match", "Idempotency-Key"} <= headers
    assert {"409", "413", "422"} <= set(ingest["responses"])
    assert "bearer" in schema["components"]["securitySchemes"]


def test_table_version_is_the_etag(client: TestClient[Any]) -> None:
    w = client.post("/v1/a/b/tables/t/rows", json=[{"x": 1}])
    assert w.headers["etag"] == '"1"'
    r = client.get("/v1/a/b/tables/t")
    assert r.headers["etag"] == '"1"'
    ok = client.post(
        "/v1/a/b/tables/t/rows", json=[{"x": 2}], headers={"If-Match": r.headers["etag"]}
    )
    assert ok.status_code == 200 and ok.headers["etag"] == '"2"'
    stale = client.post(
        "/v1/a/b/tables/t/rows", json=[{"x": 3}], headers={"If-Match": r.headers["etag"]}
    )
    assert stale.status_code == 409


def test_api_token_guards_v1_but_not_health(settings: Settings) -> None:
    import msgspec

    assert settings.redis_url
    guarded = msgspec.structs.replace(settings, api_token="s3cret")
    with authed(TestClient(create_app(guarded, settings.redis_url))) as c:
        assert c.get("/v1/orgs").status_code == 401
        assert c.get("/v1/orgs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/orgs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_org_wide_paging_is_exact_when_streams_share_ids(
    client: TestClient[Any], settings: Settings
) -> None:
    """Stream ids are unique per stream only: two supers can both hold ``<ms>-0``."""
    import redis as redis_sync

    from events.model import RowsAppended, encode_event
    from events.redis_log import Keys

    put(client, "acme/s1/tables/t", [{"x": 1}])
    put(client, "acme/s2/tables/t", [{"x": 1}])
    keys = Keys(settings.redis_prefix)
    assert settings.redis_url
    r = redis_sync.Redis.from_url(settings.redis_url)
    events = client.get("/v1/events?org=acme").json()["events"]
    last = max(int(e["id"].split("-")[0]) for e in events)
    for i in range(3):  # the same three ids in both streams
        for sup in ("s1", "s2"):
            ev = RowsAppended(
                org="acme", super_=sup, table="t", actor="me", time=datetime.now(UTC),
                version=2 + i, files=(), rows=0,
            )  # fmt: skip
            r.xadd(keys.stream("acme", sup), encode_event(ev), id=f"{last + 1 + i}-0")
    r.close()
    everything = client.get("/v1/events?org=acme&limit=1000").json()["events"]
    paged: list[dict[str, Any]] = []
    cursor = "0"
    while cursor is not None:
        page = client.get(f"/v1/events?org=acme&limit=1&after={cursor}").json()
        paged += page["events"]
        cursor = page["next_after"]
    key = [(e["id"], e["type"], e["super"], e["table"]) for e in everything]
    assert [(e["id"], e["type"], e["super"], e["table"]) for e in paged] == key
    assert len(everything) == 3 + 2 * 2 + 6  # registry, 2 tables x 2 events, 6 injected


def test_org_wide_paging_past_a_registry_full_of_other_orgs(
    client: TestClient[Any], settings: Settings
) -> None:
    import anyio

    from app.services import Services
    from events.model import OrgCreated, SuperCreated

    assert settings.redis_url
    url = settings.redis_url

    async def other_orgs() -> None:
        services = Services.build(settings, url)
        try:
            for i in range(1100):  # more than one registry page
                common: dict[str, Any] = {"org": f"o{i}", "super_": "s", "actor": "me",
                                          "time": datetime.now(UTC)}  # fmt: skip
                await services.log.ensure_super(
                    f"o{i}", "s", OrgCreated(**common), SuperCreated(**common)
                )
        finally:
            await services.close()

    anyio.run(other_orgs)
    put(client, "acme/sales/tables/t", [{"x": 1}])

    def all_pages(limit: int) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        cursor: str | None = "0"
        for _ in range(50):
            page = client.get(f"/v1/events?org=acme&limit={limit}&after={cursor}").json()
            seen += [(e["id"], e["type"]) for e in page["events"]]
            cursor = page["next_after"]
            if cursor is None:
                return seen
        raise AssertionError("paging did not end")

    one_by_one = all_pages(1)
    assert sorted(t for _, t in one_by_one) == [
        "OrgCreated", "RowsAppended", "SuperCreated", "TableCreated"
    ]  # fmt: skip
    assert all_pages(1000) == one_by_one
