"""Regression tests for what the OpenAPI fuzzing (tests/fuzz) found: answers the
document did not list, error bodies it described wrongly, request bodies it left out or
left open."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import authed

Client = TestClient[Any]
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ICEBERG_ERROR = {"$ref": "#/components/schemas/IcebergError"}


@pytest.fixture
def document(client: Client) -> dict[str, Any]:
    r = client.get("/schema/openapi.json")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def responses(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    found: dict[str, Any] = document["paths"][path][method]["responses"]
    return found


def body_schema(response: dict[str, Any]) -> Any:
    return next(iter(response["content"].values()))["schema"]


def test_every_guarded_operation_documents_the_token_guards_answers(
    document: dict[str, Any], client: Client
) -> None:
    # Found: GET /v1/orgs without a token answered 401, documented: 200 only.
    guarded = [
        (m, p) for p, ops in document["paths"].items() for m in ops
        if p.startswith(("/v1/", "/iceberg/")) and m in ("get", "post", "put", "patch", "delete")
    ]  # fmt: skip
    assert len(guarded) > 30
    for method, path in guarded:
        documented = responses(document, method, path)
        for status in ("401", "429", "503"):
            assert status in documented, (method, path, status)
    r = authed(client, "wrong").get("/v1/orgs")
    assert r.status_code == 401
    assert set(r.json()) == {"error"}


def test_a_permission_checked_in_the_path_documents_404_and_403(
    document: dict[str, Any], client: Client
) -> None:
    # Found: GET /v1/{org}/supers answered 404 org_not_found, documented: 200, 400.
    assert {"404"} <= set(responses(document, "get", "/v1/{org}/supers"))
    write = responses(document, "post", "/v1/{org}/{super}/tables/{table}/compact")
    assert {"403", "404"} <= set(write)
    r = client.get("/v1/nosuch/supers")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "org_not_found"


def test_validation_errors_are_documented_with_the_body_they_have(
    document: dict[str, Any], client: Client
) -> None:
    # Found: the 400 of PUT /v1/roles/{name} was documented as Litestar's
    # {"status_code", "detail", "extra"}; the body is {"error": {...}}.
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            bad = op.get("responses", {}).get("400") if isinstance(op, dict) else None
            if bad is None:
                continue
            expected = ICEBERG_ERROR if path.startswith("/iceberg/") else ERROR
            assert body_schema(bad) == expected, (method, path)
    r = client.put("/v1/roles/loader", json={"org": "acme"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"


def test_request_bodies_refuse_unknown_fields_in_the_document_too(
    document: dict[str, Any], client: Client
) -> None:
    # Found: nearly every generated body was refused (400 "Object contains unknown
    # field"), since the schemas allowed any extra property.
    schemas = document["components"]["schemas"]
    for name in ("QueryRequest", "DeleteRequest", "PrincipalIn", "GrantIn", "RoleIn"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "additionalProperties" not in schemas["TableDetail"]  # responses stay open
    r = client.post("/v1/acme/sales/query", json={"sql": "select 1", "extra": 1})
    assert r.status_code == 400


def test_post_rows_documents_its_body_and_modes(document: dict[str, Any]) -> None:
    # Found: the route streams its body itself, so the document had no requestBody and
    # no fuzzer (or client generator) ever sent rows.
    op = document["paths"]["/v1/{org}/{super}/tables/{table}/rows"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {
        "application/json",
        "application/x-ndjson",
        "text/csv",
        "application/vnd.apache.parquet",
        "application/vnd.apache.arrow.stream",
    }
    assert content["application/json"]["schema"]["type"] == "array"
    mode = next(p for p in op["parameters"] if p["name"] == "mode")
    assert mode["schema"]["enum"] == ["append", "overwrite", "upsert"]


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/principals", {"403", "404", "409"}),
        ("patch", "/v1/principals/{principal_id}", {"403", "404"}),
        ("post", "/v1/principals/{principal_id}/tokens", {"403", "404"}),
        ("delete", "/v1/tokens/{token_id}", {"404"}),
        ("post", "/v1/grants", {"403", "404"}),
        ("delete", "/v1/grants/{grant_id}", {"403", "404"}),
        ("put", "/v1/roles/{name}", {"403", "404"}),
        ("get", "/v1/roles", {"404"}),
        ("get", "/v1/config", {"403"}),
        ("get", "/health", {"503"}),
        ("get", "/metrics", {"503"}),
        ("get", "/iceberg/v1/namespaces/{namespace}", {"404"}),
        ("get", "/iceberg/v1/orgs/{prefix}/namespaces/{namespace}/tables/{table}", {"404"}),
    ],
)
def test_the_routes_own_refusals_are_documented(
    document: dict[str, Any], method: str, path: str, statuses: set[str]
) -> None:
    # Found: each answered one of these (e.g. DELETE /v1/tokens/0: 404 token_not_found)
    # while documenting only 200 (or 201) and 400.
    assert statuses <= set(responses(document, method, path))


def test_the_routes_own_refusals_have_the_documented_body(client: Client) -> None:
    r = client.delete("/v1/tokens/t_nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "token_not_found"
    r = client.get("/iceberg/v1/namespaces/nosuch")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "code"}


@pytest.mark.parametrize("expires_in_s", [1.7203022949717968e16, 1e12, 3.2e9])
def test_a_token_expiry_past_the_calendar_is_a_400_not_a_500(
    client: Client, expires_in_s: float
) -> None:
    # Found: POST /v1/principals/{id}/tokens {"expires_in_s": 1.72e16} answered 500 (the
    # expiry instant overflowed datetime), and issued nothing but logged a traceback.
    pid = client.post("/v1/principals", json={"name": "p", "org": "acme"}).json()["id"]
    r = client.post(f"/v1/principals/{pid}/tokens", json={"expires_in_s": expires_in_s})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_expiry"
    longest = client.post(f"/v1/principals/{pid}/tokens", json={"expires_in_s": 3.1e9})
    assert longest.status_code == 201, longest.text
