"""Helpers for the mutation and time-travel API tests: one table, acme/sales/orders,
driven through the real HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
from litestar.testing import TestClient

ORG, SUP, TBL = "acme", "sales", "orders"
BASE = f"/v1/{ORG}/{SUP}"
QUERY = f"{BASE}/query"
ARROW = "application/vnd.apache.arrow.stream"

Client = TestClient[Any]


def table_url(table: str = TBL, suffix: str = "") -> str:
    return f"{BASE}/tables/{table}{suffix}"


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"].strip()
    return dict(error)


def append(client: Client, rows: list[dict[str, Any]], table: str = TBL) -> dict[str, Any]:
    body: dict[str, Any] = ok(client.post(table_url(table, "/rows"), json=rows))
    return body


def upsert_call(
    client: Client,
    rows: list[dict[str, Any]],
    key: str = "id",
    *,
    newer_than: str | None = None,
    table: str = TBL,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    params = {"mode": "upsert", "key": key}
    if newer_than is not None:
        params["newer_than"] = newer_than
    return client.post(table_url(table, "/rows"), params=params, json=rows, headers=headers)


def upsert(client: Client, rows: list[dict[str, Any]], key: str = "id", **kw: Any) -> Any:
    return ok(upsert_call(client, rows, key, **kw))


def delete_call(
    client: Client, body: Any, *, table: str = TBL, headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(table_url(table, "/delete"), json=body, headers=headers)


def query_call(client: Client, sql: str, **extra: Any) -> httpx.Response:
    return client.post(QUERY, json={"sql": sql, **extra})


def query(client: Client, sql: str, **extra: Any) -> list[list[Any]]:
    rows: list[list[Any]] = ok(query_call(client, sql, **extra))["rows"]
    return rows


def query_arrow(client: Client, sql: str, **extra: Any) -> pa.Table:
    r = client.post(QUERY, json={"sql": sql, **extra}, headers={"accept": ARROW})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(ARROW)
    return pa.ipc.open_stream(r.content).read_all()


def detail(client: Client, table: str = TBL) -> dict[str, Any]:
    body: dict[str, Any] = ok(client.get(table_url(table)))
    return body


def version_of(client: Client, table: str = TBL) -> int:
    return int(detail(client, table)["version"])


def events(client: Client, table: str = TBL) -> list[dict[str, Any]]:
    params = {"org": ORG, "super": SUP, "table": table, "limit": 1000}
    page = ok(client.get("/v1/events", params=params))
    assert page["next_after"] is None
    out: list[dict[str, Any]] = page["events"]
    return out


def event_ids(client: Client) -> list[str]:
    page = ok(client.get("/v1/events", params={"org": ORG, "limit": 1000}))
    return [e["id"] for e in page["events"]]


def history(client: Client, table: str = TBL) -> list[tuple[int, str, int, int]]:
    """(version, event type, rows_added, rows_removed) of every version."""
    entries = ok(client.get(table_url(table, "/history")))["entries"]
    return [(e["version"], e["event_type"], e["rows_added"], e["rows_removed"]) for e in entries]


def current_paths(client: Client, table: str = TBL) -> list[str]:
    """The paths of the table's current files, in order (from its latest version)."""
    v = version_of(client, table)
    files = ok(client.get(table_url(table, f"/versions/{v}")))["files"]
    return [f["path"] for f in files]


def stored_files(storage_root: Path) -> set[str]:
    """Every data file on local storage (staging excluded), relative to the root."""
    if not storage_root.exists():
        return set()
    return {
        str(p.relative_to(storage_root))
        for p in storage_root.rglob("*.parquet")
        if "_staging" not in p.relative_to(storage_root).parts
    }
