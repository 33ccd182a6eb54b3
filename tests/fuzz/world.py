"""The world a fuzz run works in: a real ``ledgerlake serve`` process on the session's
redis-server, a little seeded data (names the fuzzer substitutes into paths), the
caller's token, and a snapshot of everything a request could change (every event
stream of the deployment and the files of its storage)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support.processes import Procs, Server, cli_env

ADMIN_TOKEN = "fuzz-admin-token"
ORG, SUPER, TABLE = "acme", "sales", "orders"
# The one table the fuzzer may drop: dropping the seed table would leave every later
# case of the run at 404 (it is created again, between cases, once it is gone).
DOOMED = "doomed"
ROWS = [{"id": 1, "region": "eu", "amount": 9.5}, {"id": 2, "region": "us", "amount": 3.0}]


@dataclass
class World:
    """A running server, the token the fuzzer sends, and the names that exist."""

    server: Server
    redis: redis.Redis
    prefix: str
    role: str
    token: str
    # Path parameter name -> values that name something that exists.
    names: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
        )

    # -- what a request may change ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Every stream of this deployment (length, last id: nothing trims them here)
        but the query audit, and every file of the storage (staging included)."""
        streams = sorted(
            k.decode()
            for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=10_000, _type="stream")
        )
        pipe = self.redis.pipeline(transaction=False)
        for key in streams:
            pipe.xinfo_stream(key)
        infos = pipe.execute()
        root = self.server.data_dir / "files"
        files = sorted(
            key
            for key in (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            if not _mirror_owned(key)
        )
        return {
            "streams": {
                # The audit trail records refused queries too, by design (who tried what).
                key: (info["length"], _text(info["last-generated-id"]))
                for key, info in zip(streams, infos, strict=True)
                if not key.endswith(":{audit}:reads")
            },
            "files": files,
        }

    def ensure_doomed(self) -> None:
        """Re-create the droppable table once a case dropped it."""
        with self.admin() as c:
            r = c.get(f"/v1/{ORG}/{SUPER}/tables/{DOOMED}")
            if r.status_code == 404:
                _ok(c.post(f"/v1/{ORG}/{SUPER}/tables/{DOOMED}/rows", json=ROWS))


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two ``World.state`` snapshots, one line per change."""
    lines = []
    b_streams, a_streams = before["streams"], after["streams"]
    for key in sorted(set(b_streams) | set(a_streams)):
        if b_streams.get(key) != a_streams.get(key):
            lines.append(f"stream {key}: {b_streams.get(key)} -> {a_streams.get(key)}")
    b_files, a_files = set(before["files"]), set(after["files"])
    lines += [f"new file {f}" for f in sorted(a_files - b_files)]
    lines += [f"file gone {f}" for f in sorted(b_files - a_files)]
    return lines


# What the mirror runners write in the background, after any event of a table with a
# mirror (a case may turn one on): ``<org>/<super>/<table>/{_delta_log,metadata,mirror}/``.
MIRROR_DIRS = {"_delta_log", "metadata", "mirror"}


def _mirror_owned(key: str) -> bool:
    parts = key.split("/")
    return len(parts) > 4 and parts[3] in MIRROR_DIRS


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ok(response: httpx.Response) -> Any:
    assert response.status_code in (200, 201), response.text
    return response.json()


# -- starting and seeding -------------------------------------------------------------


def start_world(role: str, redis_url: str, workdir: Path) -> Iterator[World]:
    """A server for one fuzz run (``role``: ``admin`` or ``reader``), seeded; stopped
    (by pid) when the generator is closed."""
    procs = Procs()
    prefix = f"fz{uuid.uuid4().hex[:10]}"
    env = cli_env(
        redis_url=redis_url,
        redis_prefix=prefix,
        api_token=ADMIN_TOKEN,
        # Every write makes a data file (none inlined into its event), so a refused
        # write that leaves a file behind shows; no background writer (mirror runners,
        # archiver, compaction) may add files or events between a case's snapshots.
        inline_max_rows="0",
        mirrors="none",
        archive="false",
        # A fuzzer is fast: no 429s that would hide the answers.
        rate_limit_per_s="0",
        query_max_timeout_s="10",
        mcp_timeout_s="10",
    )
    client = redis.Redis.from_url(redis_url)
    try:
        server = Server(procs, workdir / "data", env, workdir).start()
        world = World(server, client, prefix, role, ADMIN_TOKEN)
        seed(world)
        yield world
    finally:
        procs.cleanup()
        client.close()


def seed(world: World) -> None:
    """acme/sales/orders with three versions, the droppable table, a custom role, and
    principals with tokens and grants: the reader (the fuzzer's caller in the reader
    run) and a victim, whose token and grant the fuzzer may revoke and remove."""
    base = f"/v1/{ORG}/{SUPER}/tables"
    with world.admin() as c:
        for rows in (ROWS, [{"id": 3, "region": "eu", "amount": -1.0}]):
            _ok(c.post(f"{base}/{TABLE}/rows", json=rows))
        _ok(c.post(f"{base}/{TABLE}/rows", params={"mode": "upsert", "key": "id"}, json=ROWS))
        _ok(c.post(f"{base}/{DOOMED}/rows", json=ROWS))
        _ok(c.put("/v1/roles/loader", json={"org": ORG, "permissions": ["write"]}))
        ids: dict[str, dict[str, str]] = {}
        for name in ("reader", "victim"):
            pid = _ok(c.post("/v1/principals", json={"name": name, "org": ORG}))["id"]
            grant = {"principal_id": pid, "role": "reader", "org": ORG}
            gid = _ok(c.post("/v1/grants", json=grant))
            tok = _ok(c.post(f"/v1/principals/{pid}/tokens", json={"name": "fuzz"}))
            ids[name] = {"principal": pid, "grant": gid["id"], "token_id": tok["id"]}
            ids[name]["token"] = tok["token"]
    if world.role == "reader":
        world.token = ids["reader"]["token"]
    victim = ids["victim"]
    world.names = {
        "org": [ORG],
        "prefix": [ORG],
        "super": [SUPER],
        "table": [TABLE],
        "version": [1, 2, 3],
        # Never the caller's own token or principal: revoking its token or disabling it
        # would leave the rest of the run at 401.
        "principal_id": [victim["principal"]],
        "token_id": [victim["token_id"]],
        "grant_id": [victim["grant"]],
        "name": ["loader"],
    }
