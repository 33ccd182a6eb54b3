"""The ``ledgerlake`` CLI as a user runs it: ingest files, query, bad input, and the
embedded redis it shares with (or starts without) a running ``serve``."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.processes import (
    Procs,
    cli_env,
    embedded_redis_pid,
    is_embedded_redis_of,
    live_embedded_redis,
    pid_alive,
    redis_pids_in_log,
)

TABLE = "acme/sales/orders"


def write_inputs(tmp: Path) -> dict[str, Path]:
    """The same kind of rows in CSV, NDJSON and Parquet (ids 1-2, 3-4, 5-6)."""
    csv_path = tmp / "orders.csv"
    csv_path.write_text("id,amount,name\n1,10,ann\n2,20,bob\n")
    nd = tmp / "orders.ndjson"
    nd.write_text('{"id": 3, "amount": 30, "name": "cy"}\n{"id": 4, "amount": 40, "name": "di"}\n')
    pq_path = tmp / "orders.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array([5, 6], pa.int64()),
                "amount": pa.array([50, 60], pa.int64()),
                "name": ["ed", "flo"],
            }
        ),
        pq_path,
    )
    return {"csv": csv_path, "ndjson": nd, "parquet": pq_path}


def ingest_json(done: Any) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr
    result: dict[str, Any] = json.loads(lines[-1])
    assert {"table", "version", "rows", "event_id"} <= result.keys(), result
    return result


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
def test_cli_ingest_and_query_share_the_running_servers_redis(
    procs: Procs, start_server: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data = ["--data-dir", str(data_dir)]
    env = cli_env()
    server = start_server(data_dir, env)
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None and is_embedded_redis_of(redis_pid, data_dir)

    versions = []
    with server.client() as http:
        for fmt, path in write_inputs(tmp_path).items():
            done = procs.cli("ingest", path, "--table", TABLE, *data, env=env)
            result = ingest_json(done)
            assert result["table"] == "orders" and result["rows"] == 2, fmt
            assert "using the running embedded redis" in done.stderr, done.stderr
            versions.append(result["version"])
            # The server sees the write as soon as the CLI has returned.
            table = http.get("/v1/acme/sales/tables/orders")
            assert table.status_code == 200, table.text
            assert table.json()["version"] == result["version"], fmt
            assert table.json()["row_count"] == 2 * len(versions)
        assert versions == [versions[0], versions[0] + 1, versions[0] + 2]

        # --format overrides the extension; --mode overwrite replaces the rows.
        odd = tmp_path / "rows.txt"
        odd.write_text("id,amount,name\n7,70,gus\n")
        over = procs.cli(
            "ingest", odd, "--table", "acme/sales/latest", "--format", "csv", *data, env=env
        )
        assert ingest_json(over)["rows"] == 1
        over = procs.cli(
            "ingest", odd, "--table", "acme/sales/latest", "--format", "csv", "--mode", "overwrite",
            *data, env=env,
        )  # fmt: skip
        assert ingest_json(over)["rows"] == 1
        latest = http.get("/v1/acme/sales/tables/latest").json()
        assert latest["row_count"] == 1

        q = http.post("/v1/acme/sales/query", json={"sql": "SELECT sum(amount) FROM orders"})
        assert q.json()["rows"] == [[210]]

    sql = "SELECT id, amount, name FROM orders ORDER BY id"
    out = procs.cli("query", sql, "--super", "acme/sales", "--format", "csv", *data, env=env)
    assert out.returncode == 0, out.stderr
    rows = csv_rows(out.stdout)
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["name"] for r in rows] == ["ann", "bob", "cy", "di", "ed", "flo"]
    out = procs.cli("query", sql, "--super", "acme/sales", "--format", "json", *data, env=env)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["amount"] for line in out.stdout.splitlines()] == [
        10,
        20,
        30,
        40,
        50,
        60,
    ]
    out = procs.cli("query", sql, "--super", "acme/sales", *data, env=env)  # table format
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["id", "|", "amount", "|", "name"]
    assert len(out.stdout.splitlines()) == 2 + 6

    # The CLI left the server's redis alone: same process, still serving.
    assert embedded_redis_pid(data_dir) == redis_pid and pid_alive(redis_pid)
    assert live_embedded_redis(data_dir) == [redis_pid]
    with server.client() as http:
        assert http.get("/health").json()["status"] == "ok"
    assert server.stop() in (0, 130)
    assert not pid_alive(redis_pid)


@pytest.mark.slow
def test_cli_without_server_starts_and_stops_its_own_redis(procs: Procs, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    procs.track_embedded(data_dir)
    data = ["--data-dir", str(data_dir)]
    env = cli_env()
    inputs = write_inputs(tmp_path)

    first = ingest_json(procs.cli("ingest", inputs["csv"], "--table", TABLE, *data, env=env))
    assert first["rows"] == 2
    started = redis_pids_in_log(data_dir)
    assert len(started) == 1, "the CLI should have started one embedded redis-server"
    assert live_embedded_redis(data_dir) == []
    assert not any(pid_alive(p) for p in started)

    # A second run with a new redis-server: the AOF kept the first write.
    out = procs.cli(
        "query",
        "SELECT id, amount FROM orders ORDER BY id",
        "--super",
        "acme/sales",
        "--format",
        "csv",
        *data,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert csv_rows(out.stdout) == [{"id": "1", "amount": "10"}, {"id": "2", "amount": "20"}]
    assert len(redis_pids_in_log(data_dir)) == 2
    assert live_embedded_redis(data_dir) == []
    assert not (data_dir / "redis" / "redis.pid").exists()


@pytest.mark.slow
def test_cli_without_server_is_not_stalled_by_embedded_redis_probes(
    procs: Procs, tmp_path: Path
) -> None:
    """Starting and stopping the embedded redis should cost milliseconds: probing a
    socket with no server yet, or the connection SHUTDOWN closes, is not worth retrying."""
    data_dir = tmp_path / "data"
    procs.track_embedded(data_dir)
    started = time.monotonic()
    done = procs.cli("replay", "--verify", "--data-dir", data_dir, env=cli_env())
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "verified 0 supers" in done.stdout
    assert live_embedded_redis(data_dir) == []
    assert elapsed < 5.0, f"`ledgerlake replay --verify` on an empty data dir took {elapsed:.1f}s"


def test_cli_bad_input_exits_non_zero_with_a_message(
    procs: Procs, tmp_path: Path, redis_url: str
) -> None:
    data_dir = tmp_path / "data"
    data = ["--data-dir", str(data_dir)]
    shared = cli_env(redis_url=redis_url, redis_prefix=f"e2e{uuid.uuid4().hex[:8]}")
    good = tmp_path / "ok.csv"
    good.write_text("id\n1\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    odd = tmp_path / "rows.xyz"
    odd.write_text("id\n1\n")
    broken = tmp_path / "broken.ndjson"
    broken.write_text('{"id": 1}\n{"id": \n')

    cases: list[tuple[list[Any], str]] = [
        (["ingest", tmp_path / "missing.csv", "--table", TABLE], "no such file"),
        (["ingest", good, "--table", "acme/sales"], "--table must look like"),
        (["ingest", good, "--table", "acme//orders"], "--table must look like"),
        (["ingest", good, "--table", "a/b/c/d"], "--table must look like"),
        (["ingest", empty, "--table", TABLE], "is empty"),
        (["ingest", good], "--table"),
        (["ingest", good, "--table", TABLE, "--mode", "merge"], "invalid choice"),
        (["ingest", good, "--table", TABLE, "--mode", "upsert"], "needs --key"),
        (["ingest", good, "--table", TABLE, "--key", "id"], "apply to --mode upsert only"),
        (["query", "SELECT 1", "--super", "acme"], "--super must look like"),
        (["ingest", good, "--table", "acme/sales/Bad-Name"], "invalid table name"),
        (["ingest", odd, "--table", TABLE], "cannot tell the format"),
        (["ingest", broken, "--table", TABLE], "error ("),
        (["query", "SELECT 1", "--super", "nobody/nothing"], "does not exist"),
    ]
    for args, message in cases:
        done = procs.cli(*args, *data, env=shared)
        assert done.returncode != 0, (args, done.stdout)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
    # Nothing of it reached the log.
    out = procs.cli("query", "SELECT 1", "--super", "acme/sales", *data, env=shared)
    assert out.returncode == 2 and "org 'acme' does not exist" in out.stderr
    # Errors before any redis is needed do not start the embedded one.
    done = procs.cli("ingest", tmp_path / "missing.csv", "--table", TABLE, *data, env=cli_env())
    assert done.returncode != 0 and "no such file" in done.stderr
    assert not (data_dir / "redis").exists()


def test_data_dir_from_environment(procs: Procs, tmp_path: Path, redis_url: str) -> None:
    """LEDGERLAKE_DATA_DIR is a documented setting: it must work like --data-dir."""
    data_dir = tmp_path / "from-env"
    env = cli_env(
        redis_url=redis_url,
        redis_prefix=f"e2e{uuid.uuid4().hex[:8]}",
        data_dir=data_dir,
        inline_max_rows="0",  # two rows would be inlined: make it a file
    )
    src = tmp_path / "rows.csv"
    src.write_text("id\n1\n2\n")
    done = procs.cli("ingest", src, "--table", TABLE, env=env)
    assert done.returncode == 0, done.stderr
    assert ingest_json(done)["rows"] == 2
    assert any((data_dir / "files").rglob("*.parquet"))


def test_cli_upsert_compact_and_time_travel(procs: Procs, tmp_path: Path, redis_url: str) -> None:
    env = cli_env(redis_url=redis_url, redis_prefix=f"e2e{uuid.uuid4().hex[:8]}")
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("id,v\n1,a\n2,b\n")
    second.write_text("id,v\n2,B\n3,c\n")
    assert procs.cli("ingest", first, "--table", TABLE, env=env).returncode == 0
    done = procs.cli("ingest", second, "--table", TABLE, "--mode", "upsert", "--key", "id", env=env)
    assert done.returncode == 0, done.stderr
    summary = ingest_json(done)
    assert (summary["version"], summary["inserted"], summary["updated"]) == (2, 1, 1)
    done = procs.cli("compact", "acme/sales", env=env)
    assert done.returncode == 0, done.stderr
    assert "acme/sales/orders: merged 1 files" in done.stdout  # the inlined batch
    sql = "select id, v from orders order by id"
    now = procs.cli("query", sql, "--super", "acme/sales", "--format", "csv", env=env)
    old = procs.cli(
        "query", sql, "--super", "acme/sales", "--format", "csv", "--as-of-version", "1", env=env
    )
    assert csv_rows(now.stdout) == [{"id": "1", "v": "a"}, {"id": "2", "v": "B"},
                                    {"id": "3", "v": "c"}]  # fmt: skip
    assert csv_rows(old.stdout) == [{"id": "1", "v": "a"}, {"id": "2", "v": "b"}]
    done = procs.cli("compact", "nobody", env=env)
    assert done.returncode != 0 and "no table matches" in done.stderr


def test_cli_over_the_api_is_subject_to_the_same_checks(
    procs: Procs, start_server: Any, tmp_path: Path
) -> None:
    """``--api``/``--token``: the CLI is an HTTP client, and the server decides."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir, cli_env())  # bootstraps an admin token
    env = cli_env()
    with server.client() as admin:
        org, sup, table = TABLE.split("/")
        rows_url = f"/v1/{org}/{sup}/tables/{table}/rows"
        assert admin.post(rows_url, json=[{"id": 1, "v": "a"}]).status_code == 200
        pid = admin.post("/v1/principals", json={"name": "r", "org": org}).json()["id"]
        grant = {"principal_id": pid, "role": "reader", "org": org}
        assert admin.post("/v1/grants", json=grant).status_code == 201
        token = admin.post(f"/v1/principals/{pid}/tokens", json={}).json()["token"]
    api = ["--api", server.url, "--token", token]
    done = procs.cli(
        "query", "select count(*) as n from " + table, "--super", f"{org}/{sup}",
        "--format", "json", *api, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip()) == {"n": 1}
    body = tmp_path / "rows.json"
    body.write_text(json.dumps([{"id": 2, "v": "b"}]))
    refused = procs.cli("ingest", body, "--table", TABLE, *api, env=env)
    assert refused.returncode != 0 and "403 forbidden" in refused.stderr, refused.stderr
    hidden = procs.cli("query", "select 1", "--super", f"other/{sup}", *api, env=env)
    assert hidden.returncode != 0 and "404 org_not_found" in hidden.stderr, hidden.stderr
    no_token = procs.cli(
        "query", "select 1", "--super", f"{org}/{sup}", "--api", server.url, env=env
    )
    assert no_token.returncode != 0 and "--token" in no_token.stderr
    with server.client() as admin:
        assert admin.get(f"/v1/{org}/{sup}/tables/{table}").json()["row_count"] == 1
