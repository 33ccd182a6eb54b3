"""``ledgerlake serve --workers N``: N server processes on one port, each a full peer on
the same Redis (as pods are). Which process answered a request is read from the access
log (its ``pid``, found by the response's request id), so each test knows it reached
every process instead of hoping so."""

from __future__ import annotations

import json
import os
import select
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.processes import Server, cli_env, pid_alive

ROWS = "/v1/acme/sales/tables/orders/rows"
PEER_ENV = b"_LEDGERLAKE_SERVE_PEER="
BACKGROUND_ENV = b"_LEDGERLAKE_SERVE_BACKGROUND="
MAX_TRIES = 400  # fresh connections before a test gives up on reaching every process

pytestmark = pytest.mark.slow


def children(server: Server) -> list[tuple[int, bytes, bytes]]:
    """The processes serve started: (pid, environment, argv)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server.pid:
            out.append((int(entry.name), environ, argv))
    return out


def peers(server: Server) -> set[int]:
    """The server processes of ``serve`` (its children that run the app)."""
    # (multiprocessing's resource tracker is a child too, not a peer)
    return {p for p, env, argv in children(server) if PEER_ENV in env and b"spawn_main" in argv}


def background(server: Server) -> set[int]:
    """serve's background process (the projections, mirrors and archive)."""
    return {pid for pid, env, _ in children(server) if BACKGROUND_ENV in env}


def answered_by(server: Server) -> dict[str, int]:
    """Request id -> the pid of the process that logged its access line."""
    out = {}
    for line in server.stderr().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("logger") == "ledgerlake.access":
            out[record["request_id"]] = record["pid"]
    return out


def each_process(
    server: Server, headers: dict[str, str], path: str, expected: set[int]
) -> dict[int, list[httpx.Response]]:
    """GET ``path`` on fresh connections until every process in ``expected`` answered;
    the responses by process."""
    sent: dict[str, httpx.Response] = {}
    by_pid: dict[int, list[httpx.Response]] = {}
    for _ in range(MAX_TRIES):
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            r = http.get(path)
        sent[r.headers["x-request-id"]] = r
        logged = answered_by(server)
        by_pid = {}
        for rid, response in sent.items():
            if rid in logged:
                by_pid.setdefault(logged[rid], []).append(response)
        if expected <= by_pid.keys():
            return by_pid
    raise AssertionError(f"only {sorted(by_pid)} of {sorted(expected)} answered")


def wait_exit(pid: int, timeout: float = 30.0) -> None:
    """Block until ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still runs after {timeout}s"
    finally:
        os.close(fd)


def start(start_server: Any, tmp_path: Path, workers: str = "2") -> Server:
    env = cli_env(serve_workers=workers, log_format="json")
    server: Server = start_server(tmp_path / "data", env)
    return server


def test_peers_serve_one_port_and_share_the_projections(start_server: Any, tmp_path: Path) -> None:
    server = start(start_server, tmp_path)
    pids = peers(server)
    assert len(pids) == 2 and server.pid not in pids
    admin = server.auth_headers()
    with server.client() as http:
        for n in range(4):
            r = http.post(ROWS, json=[{"id": n, "amount": n * 1.5}])
            assert r.status_code == 200, r.text
    # Every process serves reads, and each sees every write (one catalog, in Redis).
    by_pid = each_process(server, admin, "/v1/acme/sales/tables/orders", pids)
    for responses in by_pid.values():
        assert {r.json()["row_count"] for r in responses} == {4}
    # The projections (and mirrors, archive) run in serve's background process, apart
    # from the server processes: it holds every lease.
    with server.client() as http:
        health = http.get("/health").json()
    assert health["status"] == "ok", health
    settings_url = f"unix://{tmp_path / 'data' / 'redis' / 'redis.sock'}"
    client = redis.Redis.from_url(settings_url)
    try:
        holders = [client.get(key) for key in client.scan_iter(match="*:lease:*")]
    finally:
        client.close()
    assert holders, "no projection lease is held"
    holder_pids = {int(h.decode().split("-")[-2]) for h in holders if h}
    (worker,) = background(server)
    assert holder_pids == {worker}, (holder_pids, worker, pids)


def test_the_background_process_is_replaced_and_stops_with_serve(
    start_server: Any, tmp_path: Path
) -> None:
    server = start(start_server, tmp_path)
    (first,) = background(server)
    os.kill(first, signal.SIGKILL)
    wait_exit(first)
    with server.client() as http:  # the server processes answer meanwhile
        assert http.post(ROWS, json=[{"id": 1}]).status_code == 200
    replaced: set[int] = set()
    for _ in range(MAX_TRIES):
        replaced = background(server)
        if replaced:
            break
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/health").status_code == 200
    (second,) = replaced
    assert second != first
    # Ctrl-C at serve stops it too (it has its own session, so only serve got the signal).
    assert server.stop() == 0
    wait_exit(second)
    assert not pid_alive(second)


def test_a_revoked_token_is_refused_by_every_process(start_server: Any, tmp_path: Path) -> None:
    server = start(start_server, tmp_path)
    pids = peers(server)
    with server.client() as admin:
        assert admin.post(ROWS, json=[{"id": 1, "amount": 1.0}]).status_code == 200
        made = admin.post("/v1/principals", json={"name": "alice", "org": "acme"})
        assert made.status_code == 201, made.text
        pid = made.json()["id"]
        granted = admin.post(
            "/v1/grants", json={"principal_id": pid, "role": "reader", "org": "acme"}
        )
        assert granted.status_code == 201, granted.text
        issued = admin.post(f"/v1/principals/{pid}/tokens", json={"name": "laptop"})
        assert issued.status_code == 201, issued.text
        token = issued.json()
    alice = {"Authorization": f"Bearer {token['token']}"}
    before = each_process(server, alice, "/v1/acme/sales/tables", pids)
    assert all(r.status_code == 200 for rs in before.values() for r in rs)
    with server.client() as admin:
        assert admin.delete(f"/v1/tokens/{token['id']}").status_code == 200
    after = each_process(server, alice, "/v1/acme/sales/tables", pids)
    for responses in after.values():
        for r in responses:
            assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked", r.text


def test_a_dead_process_is_replaced_and_serve_takes_them_all_down(
    start_server: Any, tmp_path: Path
) -> None:
    server = start(start_server, tmp_path)
    first = peers(server)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_exit(victim)
    # uvicorn starts a replacement; requests are answered meanwhile (by the survivor).
    with server.client() as http:
        assert http.get("/health").status_code == 200
    replacement: set[int] = set()
    for _ in range(MAX_TRIES):
        replacement = peers(server) - first
        if replacement:
            break
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/health").status_code == 200
    assert len(replacement) == 1, "no process replaced the dead one"
    alive = (first - {victim}) | replacement
    each_process(server, server.auth_headers(), "/v1/orgs", alive)  # the new one serves

    # serve killed with SIGKILL: its processes die with it and free the port.
    alive |= background(server)
    server.kill9()
    for pid in alive:
        wait_exit(pid)
        assert not pid_alive(pid)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_bad_worker_counts_are_refused(start_server: Any, tmp_path: Path, procs: Any) -> None:
    env = cli_env(serve_workers="-1")
    done = procs.cli("serve", "--data-dir", tmp_path / "data", env=env, timeout=60)
    assert done.returncode != 0
    assert "LEDGERLAKE_SERVE_WORKERS must be 0 (one per core) or more" in done.stderr
    done = procs.cli("serve", "--workers", "x", "--data-dir", tmp_path / "data", env=env)
    assert done.returncode == 2 and "--workers: invalid int value" in done.stderr
    assert not (tmp_path / "data" / "redis").exists()  # nothing was started


def test_a_process_replaced_during_a_storage_outage_keeps_serve_up(
    procs: Any, tmp_path: Path
) -> None:
    """A replacement that starts while S3 is down must not fail its start: uvicorn would
    stop every process of serve. It starts, says so, and serves once S3 is back."""
    from tests.support.chaos import ChaosCluster

    cluster = ChaosCluster(procs, tmp_path / "c", 1)  # its first pod: --workers 2
    try:
        cluster.start()
        server = cluster.servers[0]
        with httpx.Client(base_url=server.url, headers=cluster.headers(), timeout=30) as http:
            assert http.post(ROWS, json=[{"id": 1, "amount": 1.0}]).status_code == 200
        first = peers(server)
        assert len(first) == 2
        cluster.s3.stop()
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_exit(victim)
        # The replacement's start is logged; serve neither dies nor stops its processes.
        marker = "requests that need it answer 503"
        for _ in range(MAX_TRIES):
            if marker in server.stderr() or server.proc.poll() is not None:  # type: ignore[union-attr]
                break
            with httpx.Client(base_url=server.url, timeout=30) as http:
                http.get("/health")
        assert server.proc is not None and server.proc.poll() is None, server.stderr()[-3000:]
        assert marker in server.stderr()
        cluster.s3.start()
        new = peers(server)
        assert len(new) == 2 and new != first
        rows = []
        with httpx.Client(base_url=server.url, headers=cluster.headers(), timeout=30) as http:
            for n in range(2, 12):  # fresh connections reach both processes
                r = http.post(
                    ROWS, json=[{"id": n, "amount": 1.0}], headers={"Connection": "close"}
                )
                assert r.status_code == 200, r.text
                rows.append(n)
            counted = http.post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"})
        assert counted.json()["rows"] == [[1 + len(rows)]]
    finally:
        cluster.close()
