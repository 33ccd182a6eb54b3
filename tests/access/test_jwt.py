"""JWT bearer tokens from an external identity provider: HS256, RS256 with a static
key, RS256 from a JWKS served over HTTP; every way a token can be wrong."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar.testing import TestClient

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import authed
from tests.support.lake import assert_error, ok

SECRET = "shared-secret-for-tests-0123456789abcdef"
ISS, AUD = "https://idp.example", "ledgerlake"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**extra: Any) -> dict[str, Any]:
    base = {"sub": "alice@idp", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 300}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def setup_principal(settings: Settings, external_id: str = "alice@idp") -> None:
    """A principal of acme bound to the identity, with reader on acme, and data."""
    assert settings.redis_url
    with authed(TestClient(create_app(settings, settings.redis_url))) as admin:
        ok(admin.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1}]))
        r = admin.post(
            "/v1/principals", json={"name": "alice", "org": "acme", "external_id": external_id}
        )
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        again = admin.post(
            "/v1/principals", json={"name": "a2", "org": "acme", "external_id": external_id}
        )
        assert_error(again, 409, "external_id_taken")
        g = admin.post("/v1/grants", json={"principal_id": pid, "role": "reader", "org": "acme"})
        assert g.status_code == 201, g.text


def client_with(settings: Settings, token: str) -> TestClient[Any]:
    assert settings.redis_url
    return authed(TestClient(create_app(settings, settings.redis_url)), token)


def test_hs256_tokens_and_every_way_to_get_them_wrong(settings: Settings) -> None:
    s = msgspec.structs.replace(
        settings,
        jwt_hs256_secret=SECRET,
        jwt_issuer=ISS,
        jwt_audience=AUD,
        jwt_required_scopes="lake:read",
    )
    setup_principal(s)
    good = jwt.encode(claims(scope="openid lake:read"), SECRET, algorithm="HS256")
    with client_with(s, good) as c:
        assert [o["name"] for o in ok(c.get("/v1/orgs"))["orgs"]] == ["acme"]
        assert ok(c.post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"}))[
            "rows"
        ] == [[1]]
        assert_error(
            c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 2}]), 403, "forbidden"
        )

    wrong = {
        "expired": (
            jwt.encode(
                claims(scope="lake:read", exp=int(time.time()) - 5), SECRET, algorithm="HS256"
            ),
            "token_expired",
        ),
        "no exp": (
            jwt.encode(claims(scope="lake:read", exp=None), SECRET, algorithm="HS256"),
            "invalid_jwt",
        ),
        "wrong issuer": (
            jwt.encode(claims(scope="lake:read", iss="https://evil"), SECRET, algorithm="HS256"),
            "invalid_jwt",
        ),
        "wrong audience": (
            jwt.encode(claims(scope="lake:read", aud="other"), SECRET, algorithm="HS256"),
            "invalid_jwt",
        ),
        "missing scope": (
            jwt.encode(claims(scope="openid"), SECRET, algorithm="HS256"),
            "insufficient_scope",
        ),
        "wrong secret": (
            jwt.encode(
                claims(scope="lake:read"), "another-secret-0123456789abcdef!", algorithm="HS256"
            ),
            "invalid_jwt",
        ),
        "unknown identity": (
            jwt.encode(claims(scope="lake:read", sub="mallory"), SECRET, algorithm="HS256"),
            "unknown_principal",
        ),
        "alg none": (jwt.encode(claims(scope="lake:read"), None, algorithm="none"), "invalid_jwt"),
    }
    header, payload, signature = good.split(".")
    body = json.loads(jwt.utils.base64url_decode(payload))
    body["sub"] = "bob@idp"
    forged = jwt.utils.base64url_encode(json.dumps(body).encode()).decode()
    wrong["tampered"] = (f"{header}.{forged}.{signature}", "invalid_jwt")
    for name, (token, code) in wrong.items():
        with client_with(s, token) as c:
            r = c.get("/v1/orgs")
            assert r.status_code == 401, (name, r.text)
            assert r.json()["error"]["code"] == code, (name, r.text)


def test_identity_claims_in_order(settings: Settings) -> None:
    s = msgspec.structs.replace(settings, jwt_hs256_secret=SECRET, jwt_audience=AUD)
    setup_principal(s, external_id="svc-42")
    token = jwt.encode(
        {"client_id": "svc-42", "email": "x@y", "aud": AUD, "exp": int(time.time()) + 60},
        SECRET,
        algorithm="HS256",
    )
    with client_with(s, token) as c:
        assert c.get("/v1/orgs").status_code == 200
    shadowed = jwt.encode(
        {"sub": "someone", "client_id": "svc-42", "aud": AUD, "exp": int(time.time()) + 60},
        SECRET,
        algorithm="HS256",
    )
    with client_with(s, shadowed) as c:  # sub comes first
        assert_error(c.get("/v1/orgs"), 401, "unknown_principal")


def test_rs256_with_a_static_public_key(settings: Settings, tmp_path: Path) -> None:
    key, other = rsa_key(), rsa_key()
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(key))
    s = msgspec.structs.replace(settings, jwt_public_key_file=pem, jwt_audience=AUD)
    setup_principal(s)
    with client_with(s, jwt.encode(claims(), key, algorithm="RS256")) as c:
        assert c.get("/v1/orgs").status_code == 200
    with client_with(s, jwt.encode(claims(), other, algorithm="RS256")) as c:
        assert_error(c.get("/v1/orgs"), 401, "invalid_jwt")
    # HS256 is not configured here: an HS256 token is refused, whatever its secret.
    with client_with(s, jwt.encode(claims(), "x" * 32, algorithm="HS256")) as c:
        assert_error(c.get("/v1/orgs"), 401, "invalid_jwt")


class _Jwks:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, _Jwks]]:
    """A JWKS endpoint on 127.0.0.1, stopped at the end of the test."""
    state = _Jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


def test_rs256_from_a_jwks_with_key_rotation(
    settings: Settings, jwks_server: tuple[str, _Jwks]
) -> None:
    url, jwks = jwks_server
    first, second = rsa_key(), rsa_key()
    jwks.keys = [jwk(first, "k1")]
    s = msgspec.structs.replace(settings, jwt_jwks_url=url, jwt_audience=AUD)
    setup_principal(s)
    token = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k1"})
    with client_with(s, token) as c:
        assert c.get("/v1/orgs").status_code == 200
        assert c.get("/v1/orgs").status_code == 200
        assert jwks.fetches == 1  # cached
    # The provider rotates: a token with a new kid makes the service fetch again.
    jwks.keys = [jwk(first, "k1"), jwk(second, "k2")]
    rotated = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k2"})
    with client_with(s, rotated) as c:
        assert c.get("/v1/orgs").status_code == 200
    assert jwks.fetches >= 2
    unknown = jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"kid": "k9"})
    with client_with(s, unknown) as c:
        assert_error(c.get("/v1/orgs"), 401, "invalid_jwt")


def test_jwts_are_refused_when_no_provider_is_configured(settings: Settings) -> None:
    setup_principal(settings)
    with client_with(settings, jwt.encode(claims(), SECRET, algorithm="HS256")) as c:
        assert_error(c.get("/v1/orgs"), 401, "unauthorized")


def test_a_jwt_provider_without_an_audience_is_refused(settings: Settings) -> None:
    for keys in ({"jwt_hs256_secret": SECRET}, {"jwt_jwks_url": "http://127.0.0.1:1/jwks"}):
        with pytest.raises(SystemExit, match="AUDIENCE"):
            msgspec.structs.replace(settings, **keys).validate()
