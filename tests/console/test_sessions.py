"""The console's sign-in, sessions and CSRF protection, against a real Redis: what a
browser (or a forger) can and cannot do with the session cookie."""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import pytest
import redis
from litestar.testing import TestClient

from app.access.sessions import COOKIE
from app.api.app import create_app
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, authed
from tests.support.principals import member


def console(settings: Settings) -> TestClient[Any]:
    assert settings.redis_url
    return TestClient(create_app(settings, settings.redis_url))


def sign_in(client: TestClient[Any], token: str, next_: str = "/console") -> Any:
    return client.post(
        "/console/sign-in", data={"token": token, "next": next_}, follow_redirects=False
    )


def csrf_of(client: TestClient[Any]) -> str:
    page = client.get("/console")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return found[1]


def test_without_a_session_every_page_asks_to_sign_in(settings: Settings) -> None:
    with console(settings) as c:
        for path in ("/console", "/console/acme/sales/sql", "/console/acme/s/tables/t"):
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 303
            assert r.headers["location"] == f"/console/sign-in?next={path}"
        page = c.get("/console/sign-in?next=/console/acme/sales/sql")
        assert page.status_code == 200
        assert '<label for="token">Token</label>' in page.text
        assert 'value="/console/acme/sales/sql"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        # Without a session the API refuses the console as it refuses anyone.
        assert c.get("/v1/orgs").status_code == 401


def test_sign_in_sets_a_strict_cookie_and_returns_to_the_page(settings: Settings) -> None:
    with console(settings) as c:
        r = sign_in(c, ADMIN_TOKEN, "/console/acme/sales/sql")
        assert r.status_code == 303 and r.headers["location"] == "/console/acme/sales/sql"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert "secure" not in attributes  # plain HTTP here; HTTPS below
        max_age = next(a for a in attributes if a.startswith("max-age="))
        assert 0 < int(max_age.split("=")[1]) <= settings.console_absolute_s
        # The secret never reaches the page, nor Redis.
        page = c.get("/console/acme/sales/sql")
        assert page.status_code == 200 and ADMIN_TOKEN not in page.text
    with console(msgspec.structs.replace(settings, public_url="https://ll.example")) as c:
        attributes = {
            p.strip().lower() for p in sign_in(c, ADMIN_TOKEN).headers["set-cookie"].split(";")
        }
        assert "secure" in attributes


def test_a_wrong_token_opens_no_session(settings: Settings) -> None:
    with console(settings) as c:
        for token, status in (("nope", 401), ("", 400), ("llt_t1_0000", 401)):
            r = sign_in(c, token)
            assert r.status_code == status
            assert 'role="alert"' in r.text and "set-cookie" not in r.headers
        assert c.get("/console", follow_redirects=False).status_code == 303


def test_next_never_leaves_the_console(settings: Settings) -> None:
    with console(settings) as c:
        for target in ("https://evil.example/", "//evil.example/console", "/v1/orgs",
                       "/\\evil.example", "javascript:alert(1)"):  # fmt: skip
            assert sign_in(c, ADMIN_TOKEN, target).headers["location"] == "/console"


def test_the_api_takes_the_cookie_and_wants_csrf_for_changes(settings: Settings) -> None:
    with console(settings) as c:
        sign_in(c, ADMIN_TOKEN)
        csrf = csrf_of(c)
        assert c.get("/v1/orgs").status_code == 200
        rows = [{"id": 1}]
        for headers in ({}, {"X-CSRF-Token": "wrong"}):
            refused = c.post("/v1/acme/s/tables/t/rows", json=rows, headers=headers)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "csrf_failed"
        assert c.get("/v1/orgs").json()["orgs"] == []  # nothing was written
        done = c.post("/v1/acme/s/tables/t/rows", json=rows, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200
        query = c.post("/v1/acme/s/query", json={"sql": "select count(*) n from t"},
                       headers={"X-CSRF-Token": csrf})  # fmt: skip
        assert query.json()["rows"] == [[1]]
        # The Iceberg catalog and MCP take bearer tokens only.
        assert c.get("/iceberg/v1/config").status_code == 401


def test_sign_out_ends_the_session_everywhere(settings: Settings) -> None:
    with console(settings) as c, console(settings) as other:
        sign_in(c, ADMIN_TOKEN)
        csrf = csrf_of(c)
        stolen = c.cookies[COOKIE]
        # A forged sign-out (no CSRF token) ends nothing.
        assert c.post("/console/sign-out", data={}, follow_redirects=False).status_code == 403
        assert c.get("/v1/orgs").status_code == 200
        r = c.post("/console/sign-out", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
        # Another process (another app on the same Redis) no longer knows the session.
        other.cookies[COOKIE] = stolen
        assert other.get("/v1/orgs").status_code == 401
        assert other.get("/console", follow_redirects=False).status_code == 303


def test_a_revoked_token_ends_its_session_at_once(settings: Settings) -> None:
    with authed(console(settings)) as admin, console(settings) as c:
        assert admin.post("/v1/acme/s/tables/t/rows", json=[{"id": 1}]).status_code == 200
        reader = member(admin, "ann", "acme", "reader")
        token = reader["token"]
        assert sign_in(c, token).status_code == 303
        assert c.get("/v1/acme/supers").status_code == 200
        assert admin.delete(f"/v1/tokens/{reader['token_id']}").status_code == 200
        assert c.get("/v1/acme/supers").status_code == 401
        assert c.get("/console", follow_redirects=False).status_code == 303


def test_a_reader_sees_only_its_org_and_cannot_administer(settings: Settings) -> None:
    with authed(console(settings)) as admin, console(settings) as c:
        for org in ("acme", "globex"):
            assert admin.post(f"/v1/{org}/s/tables/t/rows", json=[{"id": 1}]).status_code == 200
        sign_in(c, member(admin, "ann", "acme", "reader")["token"])
        csrf = csrf_of(c)
        assert [o["name"] for o in c.get("/v1/orgs").json()["orgs"]] == ["acme"]
        assert c.get("/v1/globex/supers").status_code == 404
        made = c.post("/v1/principals", json={"name": "x", "kind": "user", "org": "acme"},
                      headers={"X-CSRF-Token": csrf})  # fmt: skip
        assert made.status_code == 403
        write = c.post("/v1/acme/s/tables/t/rows", json=[{"id": 2}], headers={"X-CSRF-Token": csrf})
        assert write.status_code == 403
        count = admin.post("/v1/acme/s/query", json={"sql": "select count(*) from t"})
        assert count.json()["rows"] == [[1]]


def test_sessions_end_when_idle_and_at_their_absolute_end(settings: Settings) -> None:
    assert settings.redis_url
    client = redis.Redis.from_url(settings.redis_url)
    pattern = f"{settings.redis_prefix}:console:session:*"
    try:
        with console(msgspec.structs.replace(settings, console_idle_s=300.0)) as c:
            sign_in(c, ADMIN_TOKEN)
            (key,) = list(client.scan_iter(match=pattern))
            # Redis drops a session left alone past its idle timeout...
            assert 0 < client.pttl(key) <= 300_000
            client.delete(key)  # (as Redis does when the idle timeout passes)
            assert c.get("/v1/orgs").status_code == 401
            assert c.get("/console", follow_redirects=False).status_code == 303
            # ...and each request starts the idle clock again.
            sign_in(c, ADMIN_TOKEN)
            (key,) = list(client.scan_iter(match=pattern))
            client.pexpire(key, 5_000)
            assert c.get("/v1/orgs").status_code == 200
            assert client.pttl(key) > 5_000
        with console(msgspec.structs.replace(settings, console_absolute_s=2.0)) as c:
            cookie = sign_in(c, ADMIN_TOKEN).headers["set-cookie"]
            assert int(cookie.split("Max-Age=")[1].split(";")[0]) <= 2
            (key,) = [k for k in client.scan_iter(match=pattern) if client.pttl(k) <= 2_000]
            # The stored end is absolute: past it the session is gone, whatever the TTL.
            raw = client.get(key)
            assert raw is not None
            stored = msgspec.json.decode(raw)
            stored["ends"] = time.time() - 1
            client.set(key, msgspec.json.encode(stored), px=60_000)
            assert c.get("/v1/orgs").status_code == 401
            assert not client.exists(key)
    finally:
        client.close()


@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
def test_a_sign_in_form_from_another_site_is_refused(settings: Settings, origin: str) -> None:
    with console(settings) as c:
        r = c.post("/console/sign-in", data={"token": ADMIN_TOKEN, "next": "/console"},
                   headers={"Origin": origin}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 403 and "set-cookie" not in r.headers
