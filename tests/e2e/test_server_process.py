"""A real ``ledgerlake serve`` process: HTTP round trip, request ids, logs, auth, binds."""

from __future__ import annotations

import json
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.support.processes import (
    Procs,
    cli_env,
    embedded_redis_pid,
    embedded_socket,
    is_embedded_redis_of,
    pid_alive,
)

ROWS = "/v1/acme/sales/tables/orders/rows"
QUERY = "/v1/acme/sales/query"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def access_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ledgerlake.access" in line]


@pytest.mark.slow
def test_serve_round_trip_with_request_ids_in_access_log(start_server: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, cli_env())
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None and is_embedded_redis_of(redis_pid, data_dir)
    assert embedded_socket(data_dir).is_socket()  # a Unix socket, no TCP port

    seen: dict[str, str] = {}  # request id -> "METHOD path status"
    with server.client() as http:
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        seen[health.headers["x-request-id"]] = "GET /health 200"

        first = http.post(ROWS, json=[{"id": 1, "amount": 10}, {"id": 2, "amount": 20}])
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["table"] == "orders" and body["rows"] == 2 and body["event_id"]
        rid = first.headers["x-request-id"]
        assert HEX_ID.match(rid), rid
        seen[rid] = f"POST {ROWS} 200"

        # A sane incoming X-Request-ID is kept; a malformed one is replaced.
        second = http.post(
            ROWS, json=[{"id": 3, "amount": 30}], headers={"X-Request-ID": "e2e-client.id:42"}
        )
        assert second.status_code == 200, second.text
        assert second.headers["x-request-id"] == "e2e-client.id:42"
        assert second.json()["version"] == body["version"] + 1
        seen["e2e-client.id:42"] = f"POST {ROWS} 200"

        query = http.post(
            QUERY,
            json={"sql": "SELECT count(*) AS n, sum(amount) AS total FROM orders"},
            headers={"X-Request-ID": "bad id with spaces"},
        )
        assert query.status_code == 200, query.text
        qrid = query.headers["x-request-id"]
        assert qrid != "bad id with spaces" and HEX_ID.match(qrid)
        seen[qrid] = f"POST {QUERY} 200"
        result = query.json()
        assert [c["name"] for c in result["columns"]] == ["n", "total"]
        assert result["rows"] == [[3, 60]]
        assert result["row_count"] == 1 and result["truncated"] is False

        detail = http.get("/v1/acme/sales/tables/orders")
        assert detail.status_code == 200
        assert detail.json()["version"] == body["version"] + 1
        assert detail.json()["row_count"] == 3
        seen[detail.headers["x-request-id"]] = "GET /v1/acme/sales/tables/orders 200"

        missing = http.get("/v1/acme/sales/tables/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "table_not_found"
        seen[missing.headers["x-request-id"]] = "GET /v1/acme/sales/tables/nope 404"

        bad = http.post(ROWS, content=b"[{not json", headers={"Content-Type": "application/json"})
        assert 400 <= bad.status_code < 500
        assert "x-request-id" in bad.headers
        seen[bad.headers["x-request-id"]] = f"POST {ROWS} {bad.status_code}"

    # Stop first, so that every access line is flushed: then the log is complete.
    assert server.stop(signal.SIGINT) in (0, 130)  # Ctrl-C
    lines = access_lines(server.stderr())
    for rid, what in seen.items():
        matching = [line for line in lines if f"request_id={rid}" in line]
        assert len(matching) == 1, f"no single access line for {rid}: {lines}"
        assert what in matching[0], matching[0]
    # Leaving as the last client, serve stops the embedded redis it started.
    assert not pid_alive(redis_pid)


@pytest.mark.slow
def test_serve_sigterm_exits_cleanly_and_stops_embedded_redis(
    start_server: Any, tmp_path: Path
) -> None:
    """SIGTERM is how systemd, Docker and Kubernetes stop a service."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir, cli_env())
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None and is_embedded_redis_of(redis_pid, data_dir)
    with server.client() as http:
        assert http.post(ROWS, json=[{"id": 1}]).status_code == 200
    code = server.stop(signal.SIGTERM)
    assert "Application shutdown complete" in server.stderr()
    left = pid_alive(redis_pid)
    assert (code, left) == (0, False), (
        f"after SIGTERM serve exited with {code} and its embedded redis-server "
        f"(pid {redis_pid}) is {'still running' if left else 'stopped'}"
    )


def test_json_log_format_every_stderr_line_is_an_object(
    start_server: Any, tmp_path: Path, redis_url: str
) -> None:
    env = cli_env(redis_url=redis_url, redis_prefix=f"e2e{uuid.uuid4().hex[:8]}", log_format="json")
    server = start_server(tmp_path / "data", env)
    with server.client() as http:
        ok = http.post(ROWS, json=[{"id": 1}], headers={"X-Request-ID": "json-log-1"})
        assert ok.status_code == 200, ok.text
        assert http.get("/v1/acme/sales/tables/missing").status_code == 404
        assert http.post(QUERY, json={"sql": "DROP TABLE orders"}).status_code == 400
        rid_404 = http.get("/v1/nobody/supers").headers["x-request-id"]
    assert server.stop() in (0, 130)

    records = []
    for line in server.stderr().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        records.append(record)
    access = [r for r in records if r["logger"] == "ledgerlake.access"]
    by_id = {r["request_id"]: r for r in access}
    assert by_id["json-log-1"]["status"] == 200
    assert by_id["json-log-1"]["method"] == "POST" and by_id["json-log-1"]["path"] == ROWS
    assert by_id[rid_404]["status"] == 404
    assert all(isinstance(r["duration_ms"], int | float) for r in access)


# -- binds and authentication ---------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "host"),
    [("flag", "0.0.0.0"), ("flag", "::"), ("env", "0.0.0.0"), ("empty-token", "0.0.0.0")],
)
def test_non_loopback_bind_without_token_refuses_to_start(
    procs: Procs, tmp_path: Path, how: str, host: str
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir)]
    if how == "env":
        env = cli_env(host=host)
    else:
        args += ["--host", host]
        env = cli_env()
        if how == "empty-token":
            env["LEDGERLAKE_API_TOKEN"] = ""
    done = procs.cli(*args, env=env, timeout=30)
    assert done.returncode != 0
    assert "refusing to bind" in done.stderr
    assert "LEDGERLAKE_API_TOKEN" in done.stderr
    # It refused before starting anything: no embedded redis for the data dir.
    assert not (data_dir / "redis" / "redis.pid").exists()


def test_api_token_guards_v1_but_not_health(
    start_server: Any, tmp_path: Path, redis_url: str
) -> None:
    token = "s3cret-" + uuid.uuid4().hex
    env = cli_env(redis_url=redis_url, redis_prefix=f"e2e{uuid.uuid4().hex[:8]}", api_token=token)
    server = start_server(tmp_path / "data", env)
    good = {"Authorization": f"Bearer {token}"}
    with server.client(headers={}) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"

        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": token},
            {"Authorization": "Bearer"},
        ):
            denied = http.post(ROWS, json=[{"id": 1}], headers=headers)
            assert denied.status_code == 401, (headers, denied.text)
            assert denied.json()["error"]["code"] == "unauthorized"
            assert "x-request-id" in denied.headers
        assert http.get("/v1/orgs").status_code == 401
        assert http.post(QUERY, json={"sql": "SELECT 1"}).status_code == 401

        written = http.post(ROWS, json=[{"id": 1}, {"id": 2}], headers=good)
        assert written.status_code == 200, written.text
        lower = {"Authorization": f"bearer {token}"}
        query = http.post(QUERY, json={"sql": "SELECT count(*) AS n FROM orders"}, headers=lower)
        assert query.status_code == 200, query.text
        assert query.json()["rows"] == [[2]]
        assert http.get("/v1/orgs", headers=good).status_code == 200
        # Nothing was written by the rejected requests.
        table = http.get("/v1/acme/sales/tables/orders", headers=good).json()
        assert table["row_count"] == 2


def test_api_token_non_ascii_authorization_is_401_not_500(
    start_server: Any, tmp_path: Path, redis_url: str
) -> None:
    env = cli_env(redis_url=redis_url, redis_prefix=f"e2e{uuid.uuid4().hex[:8]}", api_token="tok")
    server = start_server(tmp_path / "data", env)
    with server.client() as http:
        # A Latin-1 byte in the header (a client bug or a probe) must be a plain 401.
        denied = http.get("/v1/orgs", headers={"Authorization": b"Bearer caf\xe9"})
    assert denied.status_code == 401, denied.text


def test_serve_bootstraps_an_admin_token_once(start_server: Any, tmp_path: Path) -> None:
    """On loopback with no auth configured, the first start creates an admin token,
    prints it once and keeps it in <data-dir>/admin-token (0600); the next start
    prints nothing and the token still works."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir, cli_env())
    token_file = data_dir / "admin-token"
    token = token_file.read_text().strip()
    assert token.startswith("llt_")
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert server.stderr().count(token) == 1
    with server.client(headers={}) as http:
        assert http.get("/v1/orgs").status_code == 401
        authorized = {"Authorization": f"Bearer {token}"}
        assert http.post(ROWS, json=[{"id": 1}], headers=authorized).status_code == 200
    assert server.stop() == 0

    again = start_server(data_dir, cli_env())
    assert token not in again.stderr() and "admin token" not in again.stderr()
    assert token_file.read_text().strip() == token
    with again.client() as http:
        assert http.get("/v1/acme/supers").status_code == 200
