"""The disaster-recovery drill on the embedded default, as an operator runs it: `serve`
writes, stops; the embedded Redis's directory is deleted (the whole log in Redis is
gone); ``ledgerlake recover`` rebuilds it from the archive in the data directory;
``replay --verify`` agrees; `serve` starts again with every table, row and token."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import Procs, cli_env

ORDERS = "/v1/acme/sales/tables/orders"


@pytest.mark.slow
def test_recover_after_the_embedded_redis_is_deleted(
    procs: Procs, start_server: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(archive_interval_s="3600")  # only the shutdown archives the last events
    server = start_server(data_dir, env)
    with server.client() as http:
        for i in range(5):
            assert http.post(f"{ORDERS}/rows", json=[{"id": i, "v": i * 2}]).status_code == 200
        assert http.post(f"{ORDERS}/delete", json={"keys": {"id": [0]}}).status_code == 200
        version = http.get(ORDERS).json()["version"]
        rows = http.post("/v1/acme/sales/query", json={"sql": "select * from orders order by id"})
        before = rows.json()["rows"]
    # A clean stop archives what is still waiting, on the way out.
    assert server.stop() == 0

    shutil.rmtree(data_dir / "redis")  # Redis is lost; the storage is not
    done = procs.cli("recover", "--data-dir", data_dir, env=env)
    assert done.returncode == 0, done.stderr
    assert "recovered" in done.stdout and "1 supers" in done.stdout
    again = procs.cli("recover", "--data-dir", data_dir, env=env)
    assert again.returncode == 2 and "redis_not_empty" in again.stderr
    verify = procs.cli("replay", "--verify", "--data-dir", data_dir, env=env)
    assert verify.returncode == 0 and "0 difference(s)" in verify.stdout, verify.stderr

    server = start_server(data_dir, env)  # the bootstrapped admin token still works
    with server.client() as http:
        rows = http.post("/v1/acme/sales/query", json={"sql": "select * from orders order by id"})
        assert rows.json()["rows"] == before
        r = http.post(f"{ORDERS}/rows", json=[{"id": 9, "v": 18}])
        assert r.json()["version"] == version + 1
    assert server.stop() == 0

    # The org moves to another deployment (another data dir) with export and import.
    out = tmp_path / "acme-export"
    exported = procs.cli("export", "acme", "--out", out, "--data-dir", data_dir, env=env)
    assert exported.returncode == 0 and "exported acme/sales" in exported.stdout, exported.stderr
    other = tmp_path / "other"
    procs.track_embedded(other)
    imported = procs.cli("import", out, "--data-dir", other, env=env)
    assert imported.returncode == 0 and "imported acme/sales" in imported.stdout, imported.stderr
    again = procs.cli("import", out, "--data-dir", other, env=env)
    assert again.returncode == 2 and "super_exists" in again.stderr
    burst = procs.cli("worker", "--burst", "--data-dir", other, env=env)  # project it there
    assert burst.returncode == 0, burst.stderr
    verify = procs.cli("replay", "--verify", "--data-dir", other, env=env)
    assert verify.returncode == 0 and "verified 1 supers" in verify.stdout, verify.stderr
    query = procs.cli("query", "select * from orders order by id", "--super", "acme/sales",
                      "--format", "json", "--data-dir", other, env=env)  # fmt: skip
    assert query.returncode == 0 and '"id": 9' in query.stdout, query.stderr
