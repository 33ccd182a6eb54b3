"""Acknowledged writes survive ``kill -9`` of both ``serve`` and its embedded redis."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import (
    cli_env,
    embedded_redis_pid,
    is_embedded_redis_of,
    wait_dead,
)

N_BATCHES = 12
ROWS_PER_BATCH = 5
ORDERS = "/v1/acme/sales/tables/orders"
EVENTS = "/v1/acme/ops/tables/events"


def batch(i: int) -> list[dict[str, Any]]:
    return [
        {"id": i * 100 + j, "amount": i * 10 + j, "note": f"b{i}r{j}"}
        for j in range(ROWS_PER_BATCH)
    ]


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9_of_serve_and_redis(
    start_server: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, cli_env())
    acked: list[int] = []
    request_ids: list[str] = []
    expected_sum = 0
    with server.client() as http:
        for i in range(N_BATCHES):
            r = http.post(f"{ORDERS}/rows", json=batch(i))
            assert r.status_code == 200, r.text
            assert r.json()["rows"] == ROWS_PER_BATCH
            acked.append(r.json()["version"])
            request_ids.append(r.headers["x-request-id"])
            expected_sum += sum(row["amount"] for row in batch(i))
        # A second super, and an overwrite: both must survive too.
        assert http.post(f"{EVENTS}/rows", json=[{"k": "a"}, {"k": "b"}]).status_code == 200
        over = http.post(f"{EVENTS}/rows?mode=overwrite", json=[{"k": "only"}])
        assert over.status_code == 200, over.text
        events_version = over.json()["version"]
    assert acked == list(range(acked[0], acked[0] + N_BATCHES)), acked

    # Crash everything: no shutdown hook runs, nothing is flushed on the way out.
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None and is_embedded_redis_of(redis_pid, data_dir)
    server.kill9()
    os.kill(redis_pid, signal.SIGKILL)
    wait_dead(redis_pid)

    server.start()  # same data dir: a new embedded redis loads the AOF
    new_redis = embedded_redis_pid(data_dir)
    assert new_redis is not None and new_redis != redis_pid
    assert is_embedded_redis_of(new_redis, data_dir)
    with server.client() as http:
        table = http.get(ORDERS)
        assert table.status_code == 200, table.text
        assert table.json()["version"] == acked[-1]
        assert table.json()["row_count"] == N_BATCHES * ROWS_PER_BATCH
        q = http.post(
            "/v1/acme/sales/query",
            json={"sql": "SELECT count(*), sum(amount), count(DISTINCT id) FROM orders"},
        )
        assert q.status_code == 200, q.text
        total = N_BATCHES * ROWS_PER_BATCH
        assert q.json()["rows"] == [[total, expected_sum, total]]
        history = http.get(f"{ORDERS}/history").json()["entries"]
        assert [e["version"] for e in history][-N_BATCHES:] == acked
        assert [e["request_id"] for e in history][-N_BATCHES:] == request_ids

        ev = http.get(EVENTS).json()
        assert (ev["version"], ev["row_count"]) == (events_version, 1)
        rows = http.post("/v1/acme/ops/query", json={"sql": "SELECT k FROM events"}).json()
        assert rows["rows"] == [["only"]]

        # Writing goes on from the next version.
        nxt = http.post(f"{ORDERS}/rows", json=batch(N_BATCHES))
        assert nxt.status_code == 200, nxt.text
        assert nxt.json()["version"] == acked[-1] + 1
        after = http.get(ORDERS).json()
        assert after["row_count"] == (N_BATCHES + 1) * ROWS_PER_BATCH
    assert server.stop() in (0, 130)
    wait_dead(new_redis)
