"""``GET /v1/events/stream``: the event log followed live as server-sent events, against
a real ``serve``: new events arrive as they are appended, only what the caller may read,
resumable with ``Last-Event-ID``, and a revoked token's stream ends."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.principals import member
from tests.support.processes import Server, cli_env

TOKEN = "stream-test-admin-token"
pytestmark = pytest.mark.slow


@pytest.fixture
def server(start_server: Any, tmp_path: Path) -> Server:
    env = cli_env(api_token=TOKEN, mirrors="none", archive="false")
    started: Server = start_server(tmp_path / "data", env)
    with started.client() as admin:
        for sup in ("s1", "s2"):
            assert admin.post(f"/v1/acme/{sup}/tables/t/rows", json=[{"id": 0}]).status_code == 200
    return started


class Follower:
    """Reads a stream in a thread; its messages arrive in a queue (None: it ended)."""

    def __init__(self, server: Server, token: str, params: str, **headers: str) -> None:
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.status: queue.Queue[int] = queue.Queue()
        self.client = httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=60))
        headers = {"Authorization": f"Bearer {token}", **headers}
        self.thread = threading.Thread(
            target=self._run, args=(f"/v1/events/stream?{params}", headers), daemon=True
        )
        self.thread.start()
        assert self.status.get(timeout=30) == 200

    def _run(self, path: str, headers: dict[str, str]) -> None:
        try:
            with self.client.stream("GET", path, headers=headers) as response:
                self.status.put(response.status_code)
                message: dict[str, Any] = {}
                for line in response.iter_lines():
                    if not line:
                        if "data" in message:
                            self.messages.put(message)
                        message = {}
                    elif line.startswith(("id:", "event:", "data:")):
                        key, _, value = line.partition(":")
                        message[key] = value.strip()
        except httpx.HTTPError:
            pass
        finally:
            self.messages.put(None)

    def next(self) -> dict[str, Any]:
        message = self.messages.get(timeout=30)
        assert message is not None, "the stream ended"
        return {**message, "data": json.loads(message["data"])}

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def follow(server: Server) -> Iterator[Any]:
    opened: list[Follower] = []

    def start(token: str, params: str, **headers: str) -> Follower:
        follower = Follower(server, token, params, **headers)
        opened.append(follower)
        return follower

    yield start
    for follower in opened:
        follower.close()


def write(server: Server, sup: str, rows: list[dict[str, Any]], token: str = TOKEN) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.post(f"/v1/acme/{sup}/tables/t/rows", json=rows).status_code == 200


def test_new_events_arrive_live_and_resume_from_their_id(server: Server, follow: Any) -> None:
    stream = follow(TOKEN, "org=acme")  # from now on: the earlier events are not sent
    write(server, "s1", [{"id": 1}])
    first = stream.next()
    assert first["event"] == "event"
    assert first["data"]["type"] == "RowsAppended" and first["data"]["super"] == "s1"
    assert first["id"] == f"{first['data']['id']}@s1"
    write(server, "s2", [{"id": 2}, {"id": 3}])
    second = stream.next()
    assert second["data"]["super"] == "s2" and second["data"]["rows"] == 2
    # A reconnect that sends the first one's id gets the second again, and only it.
    resumed = follow(TOKEN, "org=acme", **{"Last-Event-ID": first["id"]})
    assert resumed.next()["data"]["id"] == second["data"]["id"]
    # A super's stream, from its beginning, filtered by table.
    whole = follow(TOKEN, "org=acme&super=s1&table=t&after=0-0")
    kinds = [whole.next()["data"]["type"] for _ in range(3)]
    assert kinds == ["TableCreated", "RowsAppended", "RowsAppended"]


def test_only_what_the_caller_reads_and_a_revoked_token_ends_it(
    server: Server, follow: Any
) -> None:
    with server.client() as admin:
        reader = member(admin, "r", "acme", "reader", super="s1")
    stream = follow(reader["token"], "org=acme")
    write(server, "s2", [{"id": 9}])  # not readable by the reader: never sent
    write(server, "s1", [{"id": 10}])
    got = stream.next()
    assert got["data"]["super"] == "s1" and got["data"]["rows"] == 1
    with server.client() as admin:
        assert admin.delete(f"/v1/tokens/{reader['token_id']}").status_code == 200
    write(server, "s1", [{"id": 11}])  # wakes the stream: its caller is checked again
    assert stream.messages.get(timeout=30) is None


def test_bad_requests_are_refused(server: Server) -> None:
    with server.client() as c:
        assert c.get("/v1/events/stream?org=acme&after=nope").status_code == 400
        assert c.get("/v1/events/stream?org=nobody").status_code == 404
        assert c.get("/v1/events/stream?org=acme&table=t").status_code == 400
        assert httpx.get(f"{server.url}/v1/events/stream?org=acme").status_code == 401
