"""Principals, API tokens, grants and what they allow, through the real API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from litestar.testing import TestClient

from app.access.auth import AuthStore, hash_secret
from app.api.app import create_app
from app.settings import Settings
from events.model import TokenIssued, now
from events.redis_log import Keys, connect
from tests.conftest import ADMIN_TOKEN, authed
from tests.support.lake import assert_error, ok

Client = TestClient[Any]


@pytest.fixture
def admin(settings: Settings) -> Iterator[Client]:
    """The platform admin (the settings' static token)."""
    assert settings.redis_url
    with authed(TestClient(create_app(settings, settings.redis_url))) as c:
        yield c


def as_token(settings: Settings, token: str) -> TestClient[Any]:
    assert settings.redis_url
    return authed(TestClient(create_app(settings, settings.redis_url)), token)


def principal(admin: Client, org: str | None, name: str = "p", **extra: Any) -> str:
    body = {"name": name, "org": org, **extra}
    r = admin.post("/v1/principals", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def token_for(admin: Client, principal_id: str, **extra: Any) -> dict[str, Any]:
    r = admin.post(f"/v1/principals/{principal_id}/tokens", json=extra)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def grant(admin: Client, principal_id: str, role: str, org: str, **scope: str) -> str:
    r = admin.post(
        "/v1/grants", json={"principal_id": principal_id, "role": role, "org": org, **scope}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def seed(admin: Client) -> None:
    """acme/sales/{orders, secret} and other/sales/orders."""
    for path in (
        "acme/sales/tables/orders",
        "acme/sales/tables/secret",
        "other/sales/tables/orders",
    ):
        ok(admin.post(f"/v1/{path}/rows", json=[{"id": 1, "region": "eu"}]))


def test_requests_without_a_valid_token_are_401(settings: Settings) -> None:
    assert settings.redis_url
    with TestClient(create_app(settings, settings.redis_url)) as c:
        assert c.get("/health").status_code == 200  # health needs no token
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
            assert_error(c.get("/v1/orgs", headers=headers), 401, "unauthorized")
        forged = "llt_t_0123456789abcdef_AAAA"
        assert_error(
            c.get("/v1/orgs", headers={"Authorization": f"Bearer {forged}"}), 401, "unauthorized"
        )


def test_a_token_is_shown_once_and_works_until_revoked_on_every_pod(
    admin: Client, settings: Settings
) -> None:
    seed(admin)
    pid = principal(admin, "acme", "alice", attributes={"region": "eu"})
    grant(admin, pid, "reader", "acme")
    issued = token_for(admin, pid, name="laptop")
    assert issued["token"].startswith("llt_") and issued["principal_id"] == pid
    listed = ok(admin.get("/v1/principals"))
    assert "token" not in str(listed) or issued["token"] not in str(listed)

    # Two API "pods" (apps) on the same Redis.
    with as_token(settings, issued["token"]) as pod_a, as_token(settings, issued["token"]) as pod_b:
        assert ok(pod_a.get("/v1/orgs"))["orgs"][0]["name"] == "acme"
        assert ok(pod_b.get("/v1/acme/sales/tables"))["tables"]
        revoked = admin.delete(f"/v1/tokens/{issued['id']}")
        assert revoked.status_code == 200, revoked.text
        assert_error(pod_a.get("/v1/orgs"), 401, "token_revoked")
        assert_error(pod_b.get("/v1/orgs"), 401, "token_revoked")


def test_expired_tokens_and_disabled_principals_are_refused(
    admin: Client, settings: Settings
) -> None:
    seed(admin)
    pid = principal(admin, "acme", "bob")
    grant(admin, pid, "reader", "acme")
    live = token_for(admin, pid, expires_in_s=3600)
    assert live["expires_at"]
    # An expired token: issued (as an event) with an expiry in the past.
    secret = "expired-secret"
    assert settings.redis_url

    async def issue_expired() -> None:
        client = connect(settings.redis_url or "")
        try:
            store = AuthStore(client, Keys(settings.redis_prefix))
            await store.append(
                TokenIssued(
                    token_id="t_00000000000000aa",
                    principal_id=pid,
                    token_hash=hash_secret(secret),
                    expires_at=now() - timedelta(seconds=1),
                    org="acme",
                    super_="",
                    actor="test",
                    time=now(),
                )
            )
        finally:
            await client.aclose()

    anyio.run(issue_expired)
    with as_token(settings, f"llt_t_00000000000000aa_{secret}") as c:
        assert_error(c.get("/v1/orgs"), 401, "token_expired")
    with as_token(settings, live["token"]) as c:
        assert c.get("/v1/orgs").status_code == 200
        ok(admin.patch(f"/v1/principals/{pid}", json={"disabled": True}))
        assert_error(c.get("/v1/orgs"), 401, "principal_disabled")
        ok(admin.patch(f"/v1/principals/{pid}", json={"disabled": False}))
        assert c.get("/v1/orgs").status_code == 200
    assert_error(
        admin.post(f"/v1/principals/{pid}/tokens", json={"expires_in_s": 0}), 400, "invalid_expiry"
    )


def test_tenants_are_isolated_with_404(admin: Client, settings: Settings) -> None:
    seed(admin)
    pid = principal(admin, "acme", "w")
    grant(admin, pid, "writer", "acme")
    with as_token(settings, token_for(admin, pid)["token"]) as c:
        assert [o["name"] for o in ok(c.get("/v1/orgs"))["orgs"]] == ["acme"]
        # Another org: not found, whatever the route, and nothing is written.
        assert_error(c.get("/v1/other/supers"), 404, "org_not_found")
        assert_error(c.get("/v1/other/sales/tables"), 404, "org_not_found")
        assert_error(c.get("/v1/other/sales/tables/orders"), 404, "org_not_found")
        assert_error(
            c.post("/v1/other/sales/tables/orders/rows", json=[{"id": 2}]), 404, "org_not_found"
        )
        assert_error(
            c.post("/v1/other/sales/query", json={"sql": "select 1"}), 404, "org_not_found"
        )
        assert_error(c.get("/v1/events", params={"org": "other"}), 404, "org_not_found")
        assert_error(c.post("/v1/neworg/s/tables/t/rows", json=[{"id": 1}]), 404, "org_not_found")
        # Its own org: writes, even new supers and tables.
        ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 2, "region": "us"}]))
        ok(c.post("/v1/acme/newsuper/tables/t/rows", json=[{"id": 1}]))
    assert ok(admin.get("/v1/other/sales/tables/orders"))["row_count"] == 1


def test_a_table_grant_shows_that_table_only_and_queries_cannot_name_others(
    admin: Client, settings: Settings
) -> None:
    seed(admin)
    pid = principal(admin, "acme", "r")
    grant(admin, pid, "reader", "acme", super="sales", table="orders")
    with as_token(settings, token_for(admin, pid)["token"]) as c:
        assert [t["name"] for t in ok(c.get("/v1/acme/sales/tables"))["tables"]] == ["orders"]
        assert ok(c.get("/v1/acme/supers"))["supers"][0]["tables"] == 1
        assert_error(c.get("/v1/acme/sales/tables/secret"), 404, "table_not_found")
        assert_error(c.get("/v1/acme/sales/tables/secret/history"), 404, "table_not_found")
        rows = ok(c.post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"}))
        assert rows["rows"] == [[1]]
        # The hidden table is as unknown to SQL as one that does not exist.
        for sql in (
            "select * from secret",
            "select * from orders join secret using (id)",
            "select * from orders where id in (select id from secret)",
            "with s as (select * from secret) select * from s",
            "select * from secret AT (VERSION => 1)",
        ):
            hidden = c.post("/v1/acme/sales/query", json={"sql": sql})
            missing = c.post("/v1/acme/sales/query", json={"sql": sql.replace("secret", "nosuch")})
            assert hidden.status_code == missing.status_code != 200, (sql, hidden.text)
            said, unknown = hidden.json()["error"], missing.json()["error"]
            assert said["code"] == unknown["code"]
            assert said["message"].replace("secret", "nosuch") == unknown["message"]
        # Reading is not writing: 403 on what it can see, 404 on the rest.
        assert_error(
            c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 9}]), 403, "forbidden"
        )
        assert_error(c.delete("/v1/acme/sales/tables/orders"), 403, "forbidden")
        assert_error(
            c.post("/v1/acme/sales/tables/secret/rows", json=[{"id": 9}]), 404, "table_not_found"
        )
        events = ok(c.get("/v1/events", params={"org": "acme", "super": "sales"}))["events"]
        assert {e["table"] for e in events} == {"orders"}


def test_org_admins_manage_their_org_only(admin: Client, settings: Settings) -> None:
    seed(admin)
    boss = principal(admin, "acme", "boss")
    grant(admin, boss, "org_admin", "acme")
    with as_token(settings, token_for(admin, boss)["token"]) as c:
        r = c.post("/v1/principals", json={"name": "new", "org": "acme", "kind": "service"})
        assert r.status_code == 201, r.text
        new = r.json()["id"]
        assert_error(
            c.post("/v1/principals", json={"name": "x", "org": "other"}), 404, "org_not_found"
        )
        assert_error(c.post("/v1/principals", json={"name": "x", "admin": True}), 403, "forbidden")
        gid = c.post("/v1/grants", json={"principal_id": new, "role": "reader", "org": "acme"})
        assert gid.status_code == 201, gid.text
        bad = c.post("/v1/grants", json={"principal_id": new, "role": "owner", "org": "acme"})
        assert_error(bad, 400, "invalid_role")
        other = c.post("/v1/grants", json={"principal_id": new, "role": "reader", "org": "other"})
        assert_error(other, 404, "org_not_found")
        names = {p["name"] for p in ok(c.get("/v1/principals"))}
        assert names == {"boss", "new"}
        assert ok(c.delete(f"/v1/grants/{gid.json()['id']}"))["role"] == "reader"
    # A writer may not manage principals or grants.
    worker = principal(admin, "acme", "worker")
    grant(admin, worker, "writer", "acme")
    with as_token(settings, token_for(admin, worker)["token"]) as c:
        assert_error(c.post("/v1/principals", json={"name": "x", "org": "acme"}), 403, "forbidden")
        # Its own tokens it may issue.
        assert c.post(f"/v1/principals/{worker}/tokens", json={}).status_code == 201


def test_events_record_the_principal_and_token(admin: Client, settings: Settings) -> None:
    pid = principal(admin, "acme", "w")
    grant(admin, pid, "writer", "acme")
    issued = token_for(admin, pid)
    with as_token(settings, issued["token"]) as c:
        ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1}]))
        events = ok(c.get("/v1/events", params={"org": "acme"}))["events"]
    assert events[-1]["actor"] == f"{pid}/{issued['id']}"


def test_bad_principal_and_grant_requests_change_nothing(admin: Client) -> None:
    before = ok(admin.get("/v1/principals"))
    assert_error(admin.post("/v1/principals", json={"name": "x"}), 400, "invalid_principal")
    assert_error(
        admin.post("/v1/principals", json={"name": "x", "org": "acme", "kind": "robot"}),
        400,
        "invalid_kind",
    )
    assert_error(
        admin.post("/v1/principals", json={"name": "", "org": "acme"}), 400, "invalid_name"
    )
    assert (
        admin.post("/v1/principals", json={"name": "x", "org": "acme", "extra": 1}).status_code
        == 400
    )
    assert_error(
        admin.post("/v1/principals", json={"name": "x", "org": "Bad Org"}), 400, "invalid_name"
    )
    assert_error(admin.post("/v1/principals/p_nope/tokens", json={}), 404, "principal_not_found")
    assert_error(admin.delete("/v1/tokens/t_nope"), 404, "token_not_found")
    assert_error(admin.delete("/v1/grants/g_nope"), 404, "grant_not_found")
    pid = principal(admin, "acme", "x")
    wrong_org = admin.post(
        "/v1/grants", json={"principal_id": pid, "role": "reader", "org": "other"}
    )
    assert_error(wrong_org, 400, "invalid_scope")
    no_super = admin.post(
        "/v1/grants", json={"principal_id": pid, "role": "reader", "org": "acme", "table": "t"}
    )
    assert_error(no_super, 400, "invalid_scope")
    assert len(ok(admin.get("/v1/principals"))) == len(before) + 1


def test_rate_limit_is_per_principal_and_answers_429(settings: Settings) -> None:
    import msgspec

    limited = msgspec.structs.replace(settings, rate_limit_per_s=3)
    with as_token(limited, ADMIN_TOKEN) as c:
        assert c.get("/v1/orgs").status_code == 200
        # 3 per second: within 40 quick requests some second sees a 4th (each request
        # takes milliseconds, so they span at most a couple of second boundaries).
        responses = [c.get("/v1/orgs") for _ in range(40)]
        assert {r.status_code for r in responses} == {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limited"
        assert c.get("/health").status_code == 200  # health is not limited


def test_security_headers_and_redacted_config(admin: Client, settings: Settings) -> None:
    r = admin.get("/v1/orgs")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    config = ok(admin.get("/v1/config"))
    assert config["api_token"] == "***" and config["redis_prefix"] == settings.redis_prefix
    for response in (admin.get("/v1/config"), admin.get("/health"), admin.get("/metrics")):
        assert ADMIN_TOKEN not in response.text
    pid = principal(admin, "acme", "x")
    grant(admin, pid, "org_admin", "acme")
    with as_token(settings, token_for(admin, pid)["token"]) as c:
        assert_error(c.get("/v1/config"), 403, "forbidden")


def test_queries_and_events_are_in_the_audit(admin: Client, settings: Settings) -> None:
    seed(admin)
    reader = principal(admin, "acme", "r")
    grant(admin, reader, "reader", "acme")
    boss = principal(admin, "acme", "boss")
    grant(admin, boss, "org_admin", "acme")
    issued = token_for(admin, reader)
    with as_token(settings, issued["token"]) as c:
        ok(
            c.post(
                "/v1/acme/sales/query", json={"sql": "select * from orders join secret using (id)"}
            )
        )
        assert c.post("/v1/acme/sales/query", json={"sql": "select * from nope"}).status_code != 200
        assert_error(c.get("/v1/audit", params={"org": "acme"}), 403, "forbidden")
    with as_token(settings, token_for(admin, boss)["token"]) as c:
        queries = ok(c.get("/v1/audit", params={"org": "acme", "kind": "query"}))["entries"]
        assert [(q["principal"], q["token"], q["rows"], q["error"]) for q in queries] == [
            (reader, issued["id"], 1, ""),
            (reader, issued["id"], 0, queries[1]["error"]),
        ]
        assert queries[0]["tables"] == ["orders", "secret"] and queries[1]["error"]
        assert queries[0]["duration_ms"] >= 0 and "join secret" in queries[0]["sql"]
        by_table = ok(c.get("/v1/audit", params={"org": "acme", "table": "secret"}))["entries"]
        assert {e["kind"] for e in by_table} == {"query", "event"}
        events = ok(c.get("/v1/audit", params={"org": "acme", "kind": "RowsAppended"}))
        assert {e["table"] for e in events["entries"]} == {"orders", "secret"}
        mine = ok(c.get("/v1/audit", params={"org": "acme", "principal": boss}))["entries"]
        assert mine == []
        limited = ok(c.get("/v1/audit", params={"org": "acme", "limit": 1}))
        assert len(limited["entries"]) == 1 and limited["more"] is True
        assert_error(c.get("/v1/audit", params={"org": "other"}), 404, "org_not_found")


def test_custom_roles(admin: Client, settings: Settings) -> None:
    seed(admin)
    assert ok(admin.put("/v1/roles/loader", json={"org": "acme", "permissions": ["write"]}))[
        "permissions"
    ] == ["write"]
    assert_error(
        admin.put("/v1/roles/reader", json={"org": "acme", "permissions": []}), 400, "invalid_role"
    )
    assert_error(
        admin.put("/v1/roles/x", json={"org": "acme", "permissions": ["fly"]}), 400, "invalid_role"
    )
    roles = {
        r["name"]: r["permissions"] for r in ok(admin.get("/v1/roles", params={"org": "acme"}))
    }
    assert roles["loader"] == ["write"] and roles["reader"] == ["read"]
    pid = principal(admin, "acme", "etl")
    grant(admin, pid, "loader", "acme", super="sales")
    # The role only exists in acme.
    other = admin.post("/v1/grants", json={"principal_id": pid, "role": "loader", "org": "other"})
    assert other.status_code == 400
    with as_token(settings, token_for(admin, pid)["token"]) as c:
        ok(c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 5, "region": "eu"}]))
        assert_error(c.get("/v1/acme/sales/tables/orders"), 403, "forbidden")  # write only
        # Redefining the role changes what every grant of it allows, at once.
        ok(admin.put("/v1/roles/loader", json={"org": "acme", "permissions": ["read", "write"]}))
        assert ok(c.get("/v1/acme/sales/tables/orders"))["row_count"] == 2
        ok(admin.put("/v1/roles/loader", json={"org": "acme", "permissions": []}))  # retired
        assert_error(
            c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 6}]), 403, "forbidden"
        )


def test_a_token_cannot_mint_a_longer_lived_one(admin: Client, settings: Settings) -> None:
    """Regression (security review): a principal issuing its own token could turn a
    short-lived credential into a permanent one."""
    pid = principal(admin, "acme", "short")
    grant(admin, pid, "reader", "acme")
    short = token_for(admin, pid, expires_in_s=60)
    with as_token(settings, short["token"]) as c:
        url = f"/v1/principals/{pid}/tokens"
        assert_error(c.post(url, json={"name": "forever"}), 403, "forbidden")
        assert_error(c.post(url, json={"expires_in_s": 3600}), 403, "forbidden")
        assert c.post(url, json={"expires_in_s": 30}).status_code == 201
    forever = token_for(admin, pid)  # an admin may issue any token
    with as_token(settings, forever["token"]) as c:
        assert c.post(f"/v1/principals/{pid}/tokens", json={}).status_code == 201
