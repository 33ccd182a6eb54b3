"""The authorization matrix: every /v1 route, for every kind of caller, on an object in
its scope and on objects outside it (another org, another super, another table).

The expected outcome of each cell comes from the documented rules (README,
"Authentication and access"; docs/design.md, "Scopes and the 404 rule"), written out
below as a small model (``sees``, ``can``, ``require``), not from the app's code:

- no, a wrong, an expired or a revoked token, or a disabled principal: 401;
- what the caller has no grant on, above or (for an org or a super) under: 404 with the
  same code as a missing object (``org_not_found``, ``super_not_found``,
  ``table_not_found``, ``principal_not_found``, ...);
- what it can see but may not do: 403 ``forbidden``;
- otherwise the route's success status, with its effect (checked);
- a refused request changes nothing: no event in any stream, no data file, the same
  table version and row count;
- lists show exactly what the caller may see; a query names only tables it may read.

The routes come from ``V1_HANDLERS`` and ``ADMIN_HANDLERS`` (paths and methods): a new
route fails ``test_route_matrix`` until it has a row in ``CASES``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest
import redis
from litestar.testing import TestClient

from app.access.auth import AuthStore, hash_secret
from app.api.app import create_app
from app.api.routes import V1_HANDLERS
from app.api.routes.principals import ADMIN_HANDLERS
from app.settings import Settings
from events.model import TokenIssued, decode_event, now
from events.redis_log import Keys, connect
from tests.conftest import ADMIN_TOKEN

# -- the world ------------------------------------------------------------------------

ORGS = ("acme", "other")
SUPERS = ("ops", "sales")  # in the order lists return them
TABLES = ("orders", "secret")
ROWS = [{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]

# Built-in roles, and two custom roles of acme: "loader" may only write, "retired" was
# defined (read), granted, then retired ([]): "its grants then allow nothing".
ROLE_PERMS: dict[str, frozenset[str]] = {
    "reader": frozenset({"read"}),
    "writer": frozenset({"read", "write"}),
    "org_admin": frozenset({"read", "write", "grant"}),
    "loader": frozenset({"write"}),
    "retired": frozenset(),
}

Grant = tuple[str, str, str, str]  # role, org, super, table


@dataclass(frozen=True)
class Who:
    """A kind of caller. ``org`` None: no principal behind it (the static admin token,
    or no valid credential at all)."""

    org: str | None = None
    admin: bool = False
    grants: tuple[Grant, ...] = ()
    auth_error: str | None = None  # the 401 code its credential gets


ACME_WRITER: tuple[Grant, ...] = (("writer", "acme", "", ""),)
WHO: dict[str, Who] = {
    "admin": Who(admin=True),  # LEDGERLAKE_API_TOKEN
    "root": Who(org="", admin=True),  # a platform-admin principal with an API token
    "acme_reader": Who("acme", grants=(("reader", "acme", "", ""),)),
    "acme_writer": Who("acme", grants=ACME_WRITER),
    "acme_admin": Who("acme", grants=(("org_admin", "acme", "", ""),)),
    "table_reader": Who("acme", grants=(("reader", "acme", "sales", "orders"),)),
    "super_writer": Who("acme", grants=(("writer", "acme", "sales", ""),)),
    "loader": Who("acme", grants=(("loader", "acme", "sales", ""),)),
    "retired": Who("acme", grants=(("retired", "acme", "sales", ""),)),
    "other_admin": Who("other", grants=(("org_admin", "other", "", ""),)),
    "nogrant": Who("acme"),
    "disabled": Who("acme", grants=ACME_WRITER, auth_error="principal_disabled"),
    "revoked": Who("acme", grants=ACME_WRITER, auth_error="token_revoked"),
    "expired": Who("acme", grants=ACME_WRITER, auth_error="token_expired"),
    "anonymous": Who(auth_error="unauthorized"),
    "bogus": Who(auth_error="unauthorized"),
}
# Principals that are only ever the object of a request.
VICTIMS = {"acme_victim": "acme", "other_victim": "other"}


# -- the model ------------------------------------------------------------------------

Outcome = tuple[int, str | None]  # status, error code (None: success)


def covers(g: Grant, org: str, sup: str = "", table: str = "") -> bool:
    """The grant's scope contains the object."""
    _, g_org, g_sup, g_table = g
    return g_org == org and g_sup in ("", sup) and g_table in ("", table)


def sees(who: Who, org: str, sup: str = "", table: str = "") -> bool:
    """A grant on the object, above it, or (for an org or a super) under it."""
    if who.admin:
        return True
    if who.org != org:
        return False
    for g in who.grants:
        if covers(g, org, sup, table):
            return True
        if not table and g[1] == org and (not sup or g[2] == sup):
            return True
    return False


def can(who: Who, perm: str, org: str, sup: str = "", table: str = "") -> bool:
    return who.admin or any(
        perm in ROLE_PERMS[g[0]] and covers(g, org, sup, table) for g in who.grants
    )


def require(who: Who, perm: str | None, org: str, sup: str = "", table: str = "") -> Outcome | None:
    """The refusal for ``perm`` on the object (None: allowed)."""
    if not sees(who, org):
        return (404, "org_not_found")
    if sup and not sees(who, org, sup):
        return (404, "super_not_found")
    if table and not sees(who, org, sup, table):
        return (404, "table_not_found")
    if perm and not can(who, perm, org, sup, table):
        return (403, "forbidden")
    return None


def manages(who: Who, p_org: str, p_admin: bool) -> bool:
    """Platform admins manage everyone; an org admin the principals of its org."""
    return who.admin or (bool(p_org) and not p_admin and can(who, "grant", p_org))


# -- plumbing -------------------------------------------------------------------------

NO_BODY = object()


def t_path(t: str, suffix: str = "") -> str:
    org, sup, table = t.split("/")
    return f"/v1/{org}/{sup}/tables/{table}{suffix}"


def error_code(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class Cell:
    """One request and what must come of it."""

    method: str
    path: str
    expect: Outcome
    json: Any = NO_BODY
    params: dict[str, Any] | None = None
    # State that a refusal must leave as it was (also passed to on_success).
    snapshot: Callable[[], Any] | None = None
    on_success: Callable[[httpx.Response, Any], None] | None = None
    on_refusal: Callable[[httpx.Response], None] | None = None
    cleanup: Callable[[], None] | None = None  # after any 2xx: put the world back
    writes_files: bool = False  # a refusal must also leave the data files as they were
    read_only: bool = False  # even a success appends no event


class World:
    """The app (one instance, no background projector), its Redis and the callers."""

    def __init__(self, client: TestClient[Any], settings: Settings, r: redis.Redis) -> None:
        self.client = client
        self.settings = settings
        self.redis = r
        keys = Keys(settings.redis_prefix)
        self.streams = [keys.stream(o, s) for o in ORGS for s in SUPERS]
        self.streams += [keys.registry_stream, f"{settings.redis_prefix}:{{auth}}:events"]
        self.headers: dict[str, dict[str, str]] = {
            "admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            "anonymous": {},
            "bogus": {"Authorization": "Bearer llt_t_0123456789abcdef_forged-secret"},
        }
        self.pid: dict[str, str] = {}
        self._ids = itertools.count(1000)
        self._events_cache: dict[Any, list[tuple[str, str, str, str]]] = {}

    def next(self) -> int:
        return next(self._ids)

    def call(
        self,
        who: str,
        method: str,
        path: str,
        *,
        json: Any = NO_BODY,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        kw: dict[str, Any] = {} if json is NO_BODY else {"json": json}
        return self.client.request(
            method, path, params=params, headers=headers or self.headers[who], **kw
        )

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = self.call("admin", method, path, **kw)
        assert r.is_success, (method, path, r.text)
        return r.json()

    # -- state, as the platform admin (and Redis) see it

    def table(self, t: str) -> dict[str, Any] | None:
        r = self.call("admin", "GET", t_path(t))
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        body = r.json()
        return {
            "version": body["version"],
            "row_count": body["row_count"],
            "file_count": body["file_count"],
            "mirrors": sorted(m["format"] for m in body["mirrors"] if m["enabled"]),
        }

    def append(self, t: str, rows: list[dict[str, Any]]) -> int:
        return int(self.admin("POST", t_path(t, "/rows"), json=rows)["version"])

    def fingerprint(self) -> tuple[int, ...]:
        """The length of every event stream (the audit trail of queries aside)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xlen(stream)
        return tuple(pipe.execute())

    def files(self) -> set[str]:
        root = self.settings.storage_root
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "_staging" not in p.relative_to(root).parts
        }

    def principals(self) -> dict[str, dict[str, Any]]:
        return {p["id"]: p for p in self.admin("GET", "/v1/principals")}

    def grants(self) -> dict[str, dict[str, Any]]:
        return {g["id"]: g for g in self.admin("GET", "/v1/grants")}

    def events(self, who: str, params: dict[str, str]) -> list[tuple[str, str, str, str]]:
        """Every page of /v1/events for ``params``."""
        out: list[tuple[str, str, str, str]] = []
        after = "0-0"
        for _ in range(1000):
            r = self.call(
                who, "GET", "/v1/events", params={**params, "after": after, "limit": 1000}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            out += [
                (e["id"], e["type"], e.get("super", ""), e.get("table", "")) for e in body["events"]
            ]
            if body["next_after"] is None:
                return out
            after = body["next_after"]
        raise AssertionError("the event pages never ended")

    def admin_events(self, params: dict[str, str]) -> list[tuple[str, str, str, str]]:
        key = (tuple(sorted(params.items())), self.fingerprint())
        if key not in self._events_cache:
            self._events_cache[key] = self.events("admin", params)
        return self._events_cache[key]

    def token_ids(self, principal_id: str) -> list[str]:
        """The ids of the tokens issued to a principal, read from the auth stream."""
        issued = []
        for eid, fields in self.redis.xrange(f"{self.settings.redis_prefix}:{{auth}}:events"):
            event = decode_event(eid, fields)
            if isinstance(event, TokenIssued) and event.principal_id == principal_id:
                issued.append(event.token_id)
        return sorted(issued)

    def token_works(self, token: str) -> int:
        r = self.call(
            "admin", "GET", "/v1/principals", headers={"Authorization": f"Bearer {token}"}
        )
        return r.status_code

    # -- one cell

    def run(self, who: str, label: str, cell: Cell) -> list[str]:
        where = f"{who} @ {label}: {cell.method} {cell.path}"
        stream_lengths = self.fingerprint()
        files = self.files() if cell.writes_files else None
        before = cell.snapshot() if cell.snapshot else None
        r = self.call(who, cell.method, cell.path, json=cell.json, params=cell.params)
        problems = []
        status, code = cell.expect
        if r.status_code != status or (code is not None and error_code(r) != code):
            want = f"{status} {code}" if code else str(status)
            problems.append(f"{where}: expected {want}, got {r.status_code} {r.text[:300]}")
        if r.is_success:
            if cell.read_only and self.fingerprint() != stream_lengths:
                problems.append(f"{where}: a read appended events")
            if status < 300 and cell.on_success is not None:
                try:
                    cell.on_success(r, before)
                except AssertionError as exc:
                    problems.append(f"{where}: {exc}")
            if cell.cleanup is not None:
                cell.cleanup()
            return problems
        # Refused: nothing may have changed.
        if self.fingerprint() != stream_lengths:
            problems.append(f"{where}: refused with {r.status_code}, yet events were appended")
        if files is not None and self.files() != files:
            problems.append(f"{where}: refused with {r.status_code}, yet data files changed")
        if cell.snapshot is not None and (after := cell.snapshot()) != before:
            problems.append(f"{where}: refused, yet the state changed: {before} -> {after}")
        if cell.on_refusal is not None and status == r.status_code:
            try:
                cell.on_refusal(r)
            except AssertionError as exc:
                problems.append(f"{where}: {exc}")
        return problems


def build_world(client: TestClient[Any], settings: Settings, r: redis.Redis) -> World:
    w = World(client, settings, r)
    for org in ORGS:
        for sup in SUPERS:
            for table in TABLES:
                w.append(f"{org}/{sup}/{table}", ROWS)
    w.admin("PUT", "/v1/roles/loader", json={"org": "acme", "permissions": ["write"]})
    w.admin("PUT", "/v1/roles/retired", json={"org": "acme", "permissions": ["read"]})

    def principal(name: str, body: dict[str, Any]) -> str:
        pid = str(w.admin("POST", "/v1/principals", json={"name": name, **body})["id"])
        w.pid[name] = pid
        return pid

    for name, who in WHO.items():
        if who.org is None:
            continue
        pid = principal(name, {"admin": True} if who.admin else {"org": who.org})
        for role, org, sup, table in who.grants:
            scope = {k: v for k, v in (("super", sup), ("table", table)) if v}
            body = {"principal_id": pid, "role": role, "org": org, **scope}
            w.admin("POST", "/v1/grants", json=body)
        if name == "expired":
            continue
        issued = w.admin("POST", f"/v1/principals/{pid}/tokens", json={"name": name})
        w.headers[name] = {"Authorization": f"Bearer {issued['token']}"}
        if name == "revoked":
            w.admin("DELETE", f"/v1/tokens/{issued['id']}")
    for name, org in VICTIMS.items():
        principal(name, {"org": org})
    w.admin("PATCH", f"/v1/principals/{w.pid['disabled']}", json={"disabled": True})
    w.admin("PUT", "/v1/roles/retired", json={"org": "acme", "permissions": []})

    # An expired token: issued (as an event) with an expiry in the past.
    secret = "expired-secret"

    async def issue_expired() -> None:
        client = connect(settings.redis_url or "")
        try:
            store = AuthStore(client, Keys(settings.redis_prefix))
            await store.append(
                TokenIssued(
                    token_id="t_00000000000000ee",
                    principal_id=w.pid["expired"],
                    token_hash=hash_secret(secret),
                    expires_at=now() - timedelta(seconds=1),
                    org="acme",
                    super_="",
                    actor="test",
                    time=now(),
                )
            )
        finally:
            await client.aclose()

    anyio.run(issue_expired)
    w.headers["expired"] = {"Authorization": f"Bearer llt_t_00000000000000ee_{secret}"}
    return w


@pytest.fixture(scope="module")
def world(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One world for the module (a Settings of its own, like tests/conftest.py's).
    Compaction merges from two small files (so that a compaction always has work); no
    rate limit (the admin makes thousands of requests; the limit has its own test)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("authz") / "data",
        redis_url=redis_url,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        inline_max_rows=0,
        mirrors="none",
        api_token=ADMIN_TOKEN,
        compact_min_files=2,
        rate_limit_per_s=0,
    )
    r = redis.Redis.from_url(redis_url)
    app = create_app(settings, redis_url, run_projector=False)
    try:
        with TestClient(app) as client:
            yield build_world(client, settings, r)
    finally:
        r.close()


# -- the cases ------------------------------------------------------------------------

Targets = Callable[[str], list[str]]
Build = Callable[[World, str, str], Cell]


@dataclass(frozen=True)
class Case:
    targets: Targets
    build: Build


CASES: dict[str, Case] = {}


def case(route: str, targets: list[str] | Targets) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        pick = targets if callable(targets) else (lambda _who, ts=tuple(targets): list(ts))
        CASES[route] = Case(pick, build)
        return build

    return register


def refusal_or(who: Who, refusal: Outcome | None, success: Outcome) -> Outcome:
    if who.auth_error:
        return (401, who.auth_error)
    return refusal or success


# Table objects: in acme's scope, another table, another super, another org.
TABLE_TARGETS = ["acme/sales/orders", "acme/sales/secret", "acme/ops/orders", "other/sales/orders"]
SUPER_TARGETS = ["acme/sales", "acme/ops", "other/sales"]
TBL = "/v1/{org:str}/{super:str}/tables/{table:str}"


def table_cell(
    w: World, who: str, t: str, perm: str, method: str, suffix: str = "", **kw: Any
) -> Cell:
    expect = refusal_or(WHO[who], require(WHO[who], perm, *t.split("/")), (200, None))
    return Cell(method, t_path(t, suffix), expect, snapshot=lambda: w.table(t), **kw)


def bumped(r: httpx.Response, before: Any, after: Any, rows: int, files: int | None = None) -> None:
    assert after is not None, "the table is gone"
    assert after["version"] == before["version"] + 1, (before, after)
    assert after["row_count"] == before["row_count"] + rows, (before, after)
    if files is not None:
        assert after["file_count"] == files, (before, after)
    assert r.json().get("event_id"), r.text


@case(f"POST {TBL}/rows", TABLE_TARGETS)
def ingest_case(w: World, who: str, t: str) -> Cell:
    return table_cell(
        w, who, t, "write", "POST", "/rows",
        json=[{"id": w.next(), "region": "eu"}],
        on_success=lambda r, before: bumped(r, before, w.table(t), +1),
        writes_files=True,
    )  # fmt: skip


@case(f"POST {TBL}/delete", TABLE_TARGETS)
def delete_rows_case(w: World, who: str, t: str) -> Cell:
    n = w.next()
    w.append(t, [{"id": n, "region": "eu"}])  # a row the request deletes
    return table_cell(
        w, who, t, "write", "POST", "/delete",
        json={"keys": {"id": [n]}},
        on_success=lambda r, before: bumped(r, before, w.table(t), -1),
        writes_files=True,
    )  # fmt: skip


@case(f"POST {TBL}/restore", TABLE_TARGETS)
def restore_case(w: World, who: str, t: str) -> Cell:
    table = w.table(t)
    assert table is not None
    w.append(t, [{"id": w.next(), "region": "eu"}])  # restoring the version before undoes it
    return table_cell(
        w, who, t, "write", "POST", "/restore",
        json={"version": table["version"]},
        on_success=lambda r, before: bumped(r, before, w.table(t), -1),
        writes_files=True,
    )  # fmt: skip


@case(f"POST {TBL}/compact", TABLE_TARGETS)
def compact_case(w: World, who: str, t: str) -> Cell:
    w.append(t, [{"id": w.next(), "region": "eu"}])  # at least two small files to merge
    return table_cell(
        w, who, t, "write", "POST", "/compact",
        on_success=lambda r, before: bumped(r, before, w.table(t), 0, files=1),
        writes_files=True,
    )  # fmt: skip


@case(f"GET {TBL}/versions/{{version:int}}", TABLE_TARGETS)
def version_case(w: World, who: str, t: str) -> Cell:
    table = w.table(t)
    assert table is not None
    version = table["version"]

    def ok(r: httpx.Response, _: Any) -> None:
        assert r.json()["version"] == version, r.text

    return table_cell(
        w, who, t, "read", "GET", f"/versions/{version}", on_success=ok, read_only=True
    )


@case(f"GET {TBL}", TABLE_TARGETS)
def describe_case(w: World, who: str, t: str) -> Cell:
    def ok(r: httpx.Response, before: Any) -> None:
        body = r.json()
        assert (body["org"], body["super"], body["name"]) == tuple(t.split("/")), r.text
        assert (body["version"], body["row_count"]) == (before["version"], before["row_count"])

    return table_cell(w, who, t, "read", "GET", on_success=ok, read_only=True)


@case(f"DELETE {TBL}", TABLE_TARGETS)
def drop_case(w: World, who: str, t: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        assert w.table(t) is None, "the table is still there"
        assert r.json()["event_id"], r.text

    def recreate() -> None:
        if w.table(t) is None:
            w.append(t, ROWS)

    return table_cell(w, who, t, "write", "DELETE", on_success=ok, cleanup=recreate)


@case(f"PUT {TBL}/mirrors", TABLE_TARGETS)
def mirrors_case(w: World, who: str, t: str) -> Cell:
    table = w.table(t)
    assert table is not None
    formats = [] if table["mirrors"] else ["delta"]  # always a change

    def ok(r: httpx.Response, before: Any) -> None:
        after = w.table(t)
        assert after is not None and after["mirrors"] == formats, (before, after)
        assert after["version"] == before["version"] + 1, (before, after)

    return table_cell(
        w, who, t, "write", "PUT", "/mirrors", json={"formats": formats}, on_success=ok
    )


@case(f"PUT {TBL}/policies", TABLE_TARGETS)
def policies_case(w: World, who: str, t: str) -> Cell:
    # A new policy every time (so always a change), for org admins: it filters nobody.
    policy = {"role": "org_admin", "row_filter": f"id <> {w.next()}"}
    return table_cell(
        w, who, t, "grant", "PUT", "/policies",
        json={"policies": [policy]},
        on_success=lambda r, before: bumped(r, before, w.table(t), 0),
    )  # fmt: skip


@case(f"GET {TBL}/history", TABLE_TARGETS)
def history_case(w: World, who: str, t: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        body = r.json()
        assert body["table"] == t.split("/")[2] and body["entries"], r.text

    return table_cell(w, who, t, "read", "GET", "/history", on_success=ok, read_only=True)


@case("POST /v1/{org:str}/{super:str}/query", TABLE_TARGETS)
def query_case(w: World, who: str, t: str) -> Cell:
    """The super must be visible; the table must be readable, else it is an unknown
    name to SQL: the very error a name that exists nowhere gets."""
    org, sup, table = t.split("/")
    spec = WHO[who]
    refusal = require(spec, None, org, sup)
    if refusal is None and not can(spec, "read", org, sup, table):
        refusal = (400, "sql_error")
    sql = f"select count(*) as n from {table}"

    def ok(r: httpx.Response, before: Any) -> None:
        assert r.json()["rows"] == [[before["row_count"]]], r.text

    def same_as_missing(r: httpx.Response) -> None:
        if r.status_code != 400:
            return
        missing = w.call(
            who, "POST", f"/v1/{org}/{sup}/query", json={"sql": sql.replace(table, "nosuch")}
        )
        assert missing.status_code == 400, missing.text
        said, unknown = r.json()["error"], missing.json()["error"]
        assert said["message"].replace(table, "nosuch") == unknown["message"], (said, unknown)

    return Cell(
        "POST", f"/v1/{org}/{sup}/query", refusal_or(spec, refusal, (200, None)),
        json={"sql": sql}, snapshot=lambda: w.table(t), on_success=ok,
        on_refusal=same_as_missing, read_only=True,
    )  # fmt: skip


@case("POST /v1/{org:str}/{super:str}/query/validate", TABLE_TARGETS)
def validate_case(w: World, who: str, t: str) -> Cell:
    """As a query: planned over the caller's readable tables only."""
    org, sup, table = t.split("/")
    spec = WHO[who]
    refusal = require(spec, None, org, sup)
    if refusal is None and not can(spec, "read", org, sup, table):
        refusal = (400, "sql_error")

    def ok(r: httpx.Response, _: Any) -> None:
        body = r.json()
        assert body["valid"] and body["tables"] == [table], r.text
        assert body["columns"] == [{"name": "n", "type": "int64"}], r.text

    return Cell(
        "POST", f"/v1/{org}/{sup}/query/validate", refusal_or(spec, refusal, (200, None)),
        json={"sql": f"select count(*) as n from {table}"}, on_success=ok, read_only=True,
    )  # fmt: skip


@case("GET /v1/whoami", ["-"])
def whoami_case(w: World, who: str, _: str) -> Cell:
    spec = WHO[who]

    def ok(r: httpx.Response, _: Any) -> None:
        body = r.json()
        assert body["principal"]["admin"] == spec.admin, r.text
        if spec.org:
            assert body["principal"]["org"] == spec.org, r.text
        grants = {(g["role"], g["org"], g["super"] or "", g["table"] or "") for g in body["grants"]}
        assert grants == set(spec.grants), (grants, spec.grants)

    return Cell("GET", "/v1/whoami", refusal_or(spec, None, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


@case("GET /v1/info", ["-"])
def info_case(w: World, who: str, _: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        assert r.json()["name"] == "ledgerlake" and "api_token" not in r.text, r.text

    return Cell("GET", "/v1/info", refusal_or(WHO[who], None, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


@case("GET /v1/{org:str}/{super:str}/meta", SUPER_TARGETS)
def meta_case(w: World, who: str, target: str) -> Cell:
    spec = WHO[who]
    org, sup = target.split("/")

    def ok(r: httpx.Response, _: Any) -> None:
        body = r.json()
        want = [t for t in TABLES if sees(spec, org, sup, t)]
        assert [t["name"] for t in body["tables"]] == want, r.text
        assert body["table_count"] == len(want), r.text
        assert body["row_count"] == sum(t["row_count"] for t in body["tables"]), r.text

    expect = refusal_or(spec, require(spec, None, org, sup), (200, None))
    return Cell("GET", f"/v1/{org}/{sup}/meta", expect, on_success=ok, read_only=True)


@case("GET /v1/orgs", ["-"])
def orgs_case(w: World, who: str, _: str) -> Cell:
    spec = WHO[who]

    def ok(r: httpx.Response, _: Any) -> None:
        got = [(o["name"], o["supers"]) for o in r.json()["orgs"]]
        want = [(o, sum(sees(spec, o, s) for s in SUPERS)) for o in ORGS if sees(spec, o)]
        assert got == want, (got, want)

    return Cell("GET", "/v1/orgs", refusal_or(spec, None, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


@case("GET /v1/{org:str}/supers", list(ORGS))
def supers_case(w: World, who: str, org: str) -> Cell:
    spec = WHO[who]

    def ok(r: httpx.Response, _: Any) -> None:
        got = [(s["name"], s["tables"]) for s in r.json()["supers"]]
        want = [
            (s, sum(sees(spec, org, s, t) for t in TABLES)) for s in SUPERS if sees(spec, org, s)
        ]
        assert got == want, (got, want)

    expect = refusal_or(spec, require(spec, None, org), (200, None))
    return Cell("GET", f"/v1/{org}/supers", expect, on_success=ok, read_only=True)


@case("GET /v1/{org:str}/{super:str}/tables", SUPER_TARGETS)
def tables_case(w: World, who: str, target: str) -> Cell:
    spec = WHO[who]
    org, sup = target.split("/")

    def ok(r: httpx.Response, _: Any) -> None:
        got = [t["name"] for t in r.json()["tables"]]
        want = [t for t in TABLES if sees(spec, org, sup, t)]
        assert got == want, (got, want)

    expect = refusal_or(spec, require(spec, None, org, sup), (200, None))
    return Cell("GET", f"/v1/{org}/{sup}/tables", expect, on_success=ok, read_only=True)


EVENT_TARGETS = ["acme", "other", *SUPER_TARGETS, "acme/sales/orders", "acme/sales/secret"]


@case("GET /v1/events", EVENT_TARGETS)
def events_case(w: World, who: str, target: str) -> Cell:
    """A list like the others: the events of what the caller may read, in a scope it can
    see (404 otherwise)."""
    spec = WHO[who]
    org, sup, table = [*target.split("/"), "", ""][:3]
    params = {"org": org, **({"super": sup} if sup else {}), **({"table": table} if table else {})}

    def ok(r: httpx.Response, _: Any) -> None:
        got = w.events(who, params)
        want = [e for e in w.admin_events(params) if can(spec, "read", org, e[2], e[3])]
        assert got == want, f"{len(got)} events shown, {len(want)} readable: {got[:3]}"

    # Regression (was a bug): an org-wide listing (no `super`) was 403 for a caller
    # without read on the whole org (a table reader, a super writer, a custom role),
    # instead of the org's events it may read: the route required `read` on the org,
    # while every other list (orgs,
    # supers, tables, principals, grants, the super-wide events) filters by what the
    # caller may see, as the design says ("lists, the events API and the Iceberg REST
    # catalog filter by the same rule").
    expect = refusal_or(spec, require(spec, None, org, sup, table), (200, None))
    return Cell("GET", "/v1/events", expect, params={**params, "limit": 1000}, on_success=ok,
                read_only=True)  # fmt: skip


@case("GET /v1/events/stream", EVENT_TARGETS)
def event_stream_case(w: World, who: str, target: str) -> Cell:
    """The same events as ``GET /v1/events``, as server-sent events (read from the
    beginning, for a moment: ``timeout_s``), under the same rule."""
    spec = WHO[who]
    org, sup, table = [*target.split("/"), "", ""][:3]
    params = {"org": org, **({"super": sup} if sup else {}), **({"table": table} if table else {})}

    def ok(r: httpx.Response, _: Any) -> None:
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        lines = r.text.splitlines()
        bad = [x for x in lines if x.startswith("data:") and not x.startswith("data: {")]
        assert not bad, bad[:3]
        sent = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        got = [(e["id"], e["type"], e.get("super", ""), e.get("table", "")) for e in sent]
        assert got == w.events(who, params), f"{len(got)} events sent: {got[:3]}"

    expect = refusal_or(spec, require(spec, None, org, sup, table), (200, None))
    return Cell("GET", "/v1/events/stream", expect, on_success=ok, read_only=True,
                params={**params, "after": "0-0", "timeout_s": 0.2})  # fmt: skip


@case("GET /v1/audit", list(ORGS))
def audit_case(w: World, who: str, org: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        entries = r.json()["entries"]
        assert entries and {e["org"] for e in entries} == {org}, entries[:3]

    spec = WHO[who]
    expect = refusal_or(spec, require(spec, "grant", org), (200, None))
    return Cell("GET", "/v1/audit", expect, params={"org": org, "limit": 1000}, on_success=ok,
                read_only=True)  # fmt: skip


@case("GET /v1/config", ["-"])
def config_case(w: World, who: str, _: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        assert r.json()["api_token"] == "***" and ADMIN_TOKEN not in r.text, r.text

    spec = WHO[who]
    expect = refusal_or(spec, None if spec.admin else (403, "forbidden"), (200, None))
    return Cell("GET", "/v1/config", expect, on_success=ok, read_only=True)


def role_names(w: World, org: str) -> list[str]:
    return [r["name"] for r in w.admin("GET", "/v1/roles", params={"org": org})]


@case("PUT /v1/roles/{name:str}", list(ORGS))
def define_role_case(w: World, who: str, org: str) -> Cell:
    name = f"role_{w.next()}"

    def ok(r: httpx.Response, _: Any) -> None:
        assert name in role_names(w, org), r.text

    spec = WHO[who]
    expect = refusal_or(spec, require(spec, "grant", org), (200, None))
    return Cell(
        "PUT", f"/v1/roles/{name}", expect, json={"org": org, "permissions": ["read"]},
        snapshot=lambda: role_names(w, org), on_success=ok,
    )  # fmt: skip


@case("GET /v1/roles", list(ORGS))
def list_roles_case(w: World, who: str, org: str) -> Cell:
    def ok(r: httpx.Response, _: Any) -> None:
        assert r.json() == w.admin("GET", "/v1/roles", params={"org": org}), r.text

    spec = WHO[who]
    expect = refusal_or(spec, require(spec, None, org), (200, None))
    return Cell("GET", "/v1/roles", expect, params={"org": org}, on_success=ok, read_only=True)


@case("POST /v1/principals", [*ORGS, "platform"])
def create_principal_case(w: World, who: str, target: str) -> Cell:
    spec = WHO[who]
    name = f"new_{w.next()}"
    if target == "platform":
        body: dict[str, Any] = {"name": name, "admin": True}
        refusal = None if spec.admin else (403, "forbidden")
    else:
        body = {"name": name, "org": target}
        refusal = require(spec, "grant", target)

    def ok(r: httpx.Response, _: Any) -> None:
        created = w.principals()[r.json()["id"]]
        assert created["name"] == name and created["org"] == body.get("org"), created

    return Cell(
        "POST", "/v1/principals", refusal_or(spec, refusal, (201, None)), json=body,
        snapshot=lambda: sorted(w.principals()), on_success=ok,
    )  # fmt: skip


@case("GET /v1/principals", ["-"])
def list_principals_case(w: World, who: str, _: str) -> Cell:
    spec = WHO[who]

    def ok(r: httpx.Response, __: Any) -> None:
        got = sorted(p["id"] for p in r.json())
        want = sorted(
            p["id"]
            for p in w.principals().values()
            if p["id"] == w.pid.get(who) or manages(spec, p["org"] or "", p["admin"])
        )
        assert got == want, (got, want)

    return Cell("GET", "/v1/principals", refusal_or(spec, None, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


MISSING_PRINCIPAL = "p_0000000000000000"


def principal_targets(who: str) -> list[str]:
    """Itself (if it is a principal), a principal of acme, one of other, a platform
    admin, and an id that exists nowhere."""
    own = ["self"] if WHO[who].org is not None else []
    return [*own, "acme_victim", "other_victim", "root", "missing"]


def principal_of(w: World, who: str, target: str) -> tuple[str, str, bool]:
    """(id, org, admin) of a target principal."""
    if target == "missing":
        return MISSING_PRINCIPAL, "", False
    name = who if target == "self" else target
    spec = WHO.get(name)
    if spec is None:
        return w.pid[name], VICTIMS[name], False
    return w.pid[name], spec.org or "", spec.admin


def principal_refusal(who: str, target: str, org: str, admin: bool, code: str) -> Outcome | None:
    """404 (as for an id that exists nowhere) unless the caller manages it or is it."""
    if target == "missing" or not (target == "self" or manages(WHO[who], org, admin)):
        return (404, code)
    return None


@case("PATCH /v1/principals/{principal_id:str}", principal_targets)
def change_principal_case(w: World, who: str, target: str) -> Cell:
    pid, org, admin = principal_of(w, who, target)
    name = f"renamed_{w.next()}"
    refusal = principal_refusal(who, target, org, admin, "principal_not_found")
    if refusal is None and not manages(WHO[who], org, admin):
        refusal = (403, "forbidden")  # itself: it may see itself, not change itself

    def ok(r: httpx.Response, _: Any) -> None:
        assert w.principals()[pid]["name"] == name, r.text

    def snapshot() -> Any:
        return w.principals().get(pid)

    return Cell(
        "PATCH", f"/v1/principals/{pid}", refusal_or(WHO[who], refusal, (200, None)),
        json={"name": name}, snapshot=snapshot, on_success=ok,
    )  # fmt: skip


@case("POST /v1/principals/{principal_id:str}/tokens", principal_targets)
def issue_token_case(w: World, who: str, target: str) -> Cell:
    pid, org, admin = principal_of(w, who, target)
    refusal = principal_refusal(who, target, org, admin, "principal_not_found")

    def ok(r: httpx.Response, _: Any) -> None:
        issued = r.json()
        assert issued["principal_id"] == pid, issued
        mine = w.call(
            who, "GET", "/v1/principals", headers={"Authorization": f"Bearer {issued['token']}"}
        )
        assert mine.status_code == 200 and pid in {p["id"] for p in mine.json()}, mine.text

    return Cell(
        "POST", f"/v1/principals/{pid}/tokens", refusal_or(WHO[who], refusal, (201, None)),
        json={"name": "matrix"}, on_success=ok,
    )  # fmt: skip


@case("GET /v1/principals/{principal_id:str}/tokens", principal_targets)
def list_tokens_case(w: World, who: str, target: str) -> Cell:
    """A principal's tokens, never a secret: for its managers and itself, else the 404
    of a principal that does not exist."""
    pid, org, admin = principal_of(w, who, target)
    refusal = principal_refusal(who, target, org, admin, "principal_not_found")

    def ok(r: httpx.Response, _: Any) -> None:
        listed = r.json()
        assert {t["principal_id"] for t in listed} <= {pid}, r.text
        assert all("token" not in t and "token_hash" not in t for t in listed), r.text
        assert sorted(t["id"] for t in listed) == w.token_ids(pid)

    path = f"/v1/principals/{pid}/tokens"
    return Cell("GET", path, refusal_or(WHO[who], refusal, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


@case("DELETE /v1/tokens/{token_id:str}", principal_targets)
def revoke_token_case(w: World, who: str, target: str) -> Cell:
    pid, org, admin = principal_of(w, who, target)
    if target == "missing":
        token_id, token = "t_0000000000000000", ""
    else:  # a fresh token of the target principal
        issued = w.admin("POST", f"/v1/principals/{pid}/tokens", json={"name": "spare"})
        token_id, token = issued["id"], issued["token"]
    # Regression (was a bug): a token of a principal the caller may not manage was 404
    # `principal_not_found`,
    # while an unknown token id is 404 `token_not_found`: the answer tells a real token id
    # (of another tenant, too) from a made-up one. The 404 rule wants the code of a
    # missing object (docs/design.md, "Scopes and the 404 rule"): `token_not_found`.
    refusal = principal_refusal(who, target, org, admin, "token_not_found")

    def ok(r: httpx.Response, _: Any) -> None:
        assert r.json()["id"] == token_id, r.text
        assert w.token_works(token) == 401, "the revoked token still works"

    def snapshot() -> int:
        return w.token_works(token) if token else 0

    return Cell(
        "DELETE", f"/v1/tokens/{token_id}", refusal_or(WHO[who], refusal, (200, None)),
        snapshot=snapshot, on_success=ok,
    )  # fmt: skip


GRANT_SCOPES: dict[str, tuple[str, str, str, str]] = {
    # target: (principal, org, super, table)
    "acme": ("acme_victim", "acme", "", ""),
    "acme/sales": ("acme_victim", "acme", "sales", ""),
    "acme/ops": ("acme_victim", "acme", "ops", ""),
    "acme/sales/orders": ("acme_victim", "acme", "sales", "orders"),
    "acme/sales/secret": ("acme_victim", "acme", "sales", "secret"),
    "other": ("other_victim", "other", "", ""),
    "foreigner": ("other_victim", "acme", "", ""),  # other's principal, into acme
}


def grant_body(w: World, who: str, target: str) -> dict[str, Any]:
    if target == "self":  # org_admin of its own org, for itself
        return {"principal_id": w.pid[who], "role": "org_admin", "org": WHO[who].org}
    principal, org, sup, table = GRANT_SCOPES[target]
    scope = {k: v for k, v in (("super", sup), ("table", table)) if v}
    return {"principal_id": w.pid[principal], "role": "reader", "org": org, **scope}


@case(
    "POST /v1/grants",
    lambda who: [*GRANT_SCOPES, *(["self"] if WHO[who].org else [])],
)
def add_grant_case(w: World, who: str, target: str) -> Cell:
    spec = WHO[who]
    body = grant_body(w, who, target)
    refusal = require(spec, "grant", body["org"], body.get("super", ""), body.get("table", ""))
    if target == "self":
        p_org, p_admin, is_self = spec.org or "", spec.admin, True
    else:
        principal = GRANT_SCOPES[target][0]
        p_org, p_admin, is_self = VICTIMS[principal], False, False
    if refusal is None and not (is_self or manages(spec, p_org, p_admin)):
        refusal = (404, "principal_not_found")
    if refusal is None and p_org != body["org"]:
        refusal = (400, "invalid_scope")

    def ok(r: httpx.Response, _: Any) -> None:
        made = w.grants()[r.json()["id"]]
        assert (made["principal_id"], made["org"], made["super"], made["table"]) == (
            body["principal_id"], body["org"], body.get("super"), body.get("table"),
        ), made  # fmt: skip

    return Cell(
        "POST", "/v1/grants", refusal_or(spec, refusal, (201, None)), json=body,
        snapshot=lambda: sorted(w.grants()), on_success=ok,
    )  # fmt: skip


@case("GET /v1/grants", ["-"])
def list_grants_case(w: World, who: str, _: str) -> Cell:
    spec = WHO[who]

    def ok(r: httpx.Response, __: Any) -> None:
        got = sorted(g["id"] for g in r.json())
        want = sorted(
            g["id"]
            for g in w.grants().values()
            if g["principal_id"] == w.pid.get(who)
            or can(spec, "grant", g["org"], g["super"] or "", g["table"] or "")
        )
        assert got == want, (got, want)

    return Cell("GET", "/v1/grants", refusal_or(spec, None, (200, None)), on_success=ok,
                read_only=True)  # fmt: skip


@case("DELETE /v1/grants/{grant_id:str}", [*list(GRANT_SCOPES)[:-1], "missing"])
def remove_grant_case(w: World, who: str, target: str) -> Cell:
    spec = WHO[who]
    if target == "missing":
        grant_id, refusal = "g_0000000000000000", (404, "grant_not_found")
    else:  # a fresh grant on that scope
        body = grant_body(w, who, target)
        grant_id = w.admin("POST", "/v1/grants", json=body)["id"]
        scope = (body["org"], body.get("super", ""), body.get("table", ""))
        refusal = (404, "grant_not_found") if not sees(spec, *scope) else None
        if refusal is None and not can(spec, "grant", *scope):
            refusal = (403, "forbidden")

    def ok(r: httpx.Response, _: Any) -> None:
        assert grant_id not in w.grants(), r.text

    return Cell(
        "DELETE", f"/v1/grants/{grant_id}", refusal_or(spec, refusal, (200, None)),
        snapshot=lambda: grant_id in w.grants(), on_success=ok,
    )  # fmt: skip


# -- the tests ------------------------------------------------------------------------


def routes_of(handlers: list[Any]) -> list[str]:
    return sorted(
        f"{method} {path}"
        for handler in handlers
        for path in handler.paths
        for method in handler.http_methods
    )


ROUTES = routes_of([*V1_HANDLERS, *ADMIN_HANDLERS])


def test_the_matrix_has_no_stale_row_and_the_app_no_unlisted_v1_route(world: World) -> None:
    assert sorted(CASES) == ROUTES
    served = sorted(
        f"{method} {route.path}"
        for route in world.client.app.routes
        if route.path.startswith("/v1/")
        for method in route.methods
        if method != "OPTIONS"
    )
    assert served == ROUTES


@pytest.mark.parametrize("route", ROUTES)
def test_route_matrix(world: World, route: str) -> None:
    """Every caller on every target of the route: the exact status and error code, the
    effect of a success, no effect of a refusal."""
    entry = CASES.get(route)
    assert entry is not None, f"{route} has no row in the authorization matrix (CASES)"
    problems: list[str] = []
    cells = 0
    for who in WHO:
        for target in entry.targets(who):
            problems += world.run(who, target, entry.build(world, who, target))
            cells += 1
    assert cells >= len(WHO)
    assert not problems, f"{len(problems)} of {cells} cells:\n" + "\n".join(problems)


HIDING_SQL = (
    "select * from {t}",
    "select count(*) from {t}",
    "select * from orders join {t} using (id)",
    "select * from orders where id in (select id from {t})",
    "with s as (select * from {t}) select * from s",
    "select * from {t} AT (VERSION => 1)",
    "select * from (select 1 as id) x left join {t} using (id)",
)


def assert_same_as_missing(w: World, who: str, sql: str, table: str) -> None:
    hidden = w.call(who, "POST", "/v1/acme/sales/query", json={"sql": sql.format(t=table)})
    missing = w.call(who, "POST", "/v1/acme/sales/query", json={"sql": sql.format(t="nosuch")})
    assert missing.status_code == 400, missing.text
    assert hidden.status_code == missing.status_code, (who, sql, hidden.text)
    said, unknown = hidden.json()["error"], missing.json()["error"]
    assert said["code"] == unknown["code"], (said, unknown)
    assert said["message"].replace(table, "nosuch") == unknown["message"], (said, unknown)


def test_a_table_scoped_reader_gets_for_a_hidden_table_the_error_of_a_missing_one(
    world: World,
) -> None:
    w = world
    for sql in HIDING_SQL:
        assert_same_as_missing(w, "table_reader", sql, "secret")
    # The routes alike: the same 404, code and message, as for a table that never was.
    for suffix in ("", "/history", "/versions/1", "/rows", "/compact"):
        method = "POST" if suffix in ("/rows", "/compact") else "GET"
        body = [{"id": 1}] if suffix == "/rows" else NO_BODY
        hidden = w.call("table_reader", method, t_path("acme/sales/secret", suffix), json=body)
        missing = w.call("table_reader", method, t_path("acme/sales/nosuch", suffix), json=body)
        assert hidden.status_code == missing.status_code == 404, (suffix, hidden.text)
        said, unknown = hidden.json()["error"], missing.json()["error"]
        assert said["code"] == unknown["code"] == "table_not_found", (said, unknown)
        assert said["message"].replace("secret", "nosuch") == unknown["message"]
    # While the same SQL on the table it may read works.
    r = w.call("table_reader", "POST", "/v1/acme/sales/query", json={"sql": "select 1 from orders"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("who", ["loader", "retired"])
def test_a_role_without_read_cannot_read_through_sql(world: World, who: str) -> None:
    """ "A query can only name the tables it may read": a custom role that may only write
    (loader), or one retired ("its grants then allow nothing"), reads nothing."""
    w = world
    # It sees the tables (403 on the table itself, not 404)...
    r = w.call(who, "GET", t_path("acme/sales/orders"))
    assert r.status_code == 403 and error_code(r) == "forbidden", r.text
    # ...and may not read them through SQL either.
    # Regression: the query route gave the engine a view of every table the caller
    # *sees*, not of those it may *read*; with a write-only or retired custom role the
    # query returned every row. (Forms naming `orders` twice are left out: there both
    # queries fail on the same unreadable `orders`.)
    for sql in HIDING_SQL:
        if "orders" not in sql:
            assert_same_as_missing(w, who, sql, "orders")


# -- policies: no route serves what a policy hides ------------------------------------------

PEOPLE = [
    {"id": 1, "region": "eu", "email": "alice@eu.example", "ssn": "ssn-111-hidden", "note": "a"},
    {"id": 2, "region": "eu", "email": "bob@eu.example", "ssn": "ssn-222-hidden", "note": "b"},
    {"id": 3, "region": "us", "email": "carol@us.example", "ssn": "ssn-333-hidden",
     "note": "zz-us-only-note"},
]  # fmt: skip
POLICY = {
    "role": "reader",
    "row_filter": "region = :principal.region",
    "hidden": ["ssn"],
    "masks": {"email": "hash"},
}


def test_no_route_shows_a_policy_bound_reader_what_its_policy_hides(settings: Settings) -> None:
    """A reader bound by a policy (rows of its region, ssn hidden, email hashed) may use
    every read route; none of them may show it a hidden value, a raw masked value, or a
    value of a row its filter excludes."""
    assert settings.redis_url
    with TestClient(create_app(settings, settings.redis_url, run_projector=False)) as c:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        url = "/v1/acme/sales/tables/people"
        assert c.post(f"{url}/rows", json=PEOPLE, headers=admin).status_code == 200
        pid = c.post(
            "/v1/principals",
            json={"name": "eu", "org": "acme", "attributes": {"region": "eu"}},
            headers=admin,
        ).json()["id"]
        grant = {"principal_id": pid, "role": "reader", "org": "acme"}
        assert c.post("/v1/grants", json=grant, headers=admin).status_code == 201
        token = c.post(f"/v1/principals/{pid}/tokens", json={}, headers=admin).json()["token"]
        r = c.put(f"{url}/policies", json={"policies": [POLICY]}, headers=admin)
        assert r.status_code == 200, r.text
        reader = {"Authorization": f"Bearer {token}"}
        forbidden = [p["ssn"] for p in PEOPLE] + [p["email"] for p in PEOPLE]
        forbidden += [str(PEOPLE[2]["note"])]

        def get(path: str, **params: str) -> httpx.Response:
            response = c.get(path, params=params, headers=reader)
            assert response.status_code == 200, (path, response.text)
            return response

        query = c.post("/v1/acme/sales/query", json={"sql": "select * from people"}, headers=reader)
        assert query.status_code == 200, query.text
        eu = hashlib.sha256(b"alice@eu.example").hexdigest()
        assert eu in query.text  # the policy is in force (hashed, not hidden)
        responses = {
            "query": query,
            "table": get(url),
            "version 2": get(f"{url}/versions/2"),
            "history": get(f"{url}/history"),
            "tables": get("/v1/acme/sales/tables"),
            "events of the table": get("/v1/events", org="acme", super="sales", table="people"),
            "events of the org": get("/v1/events", org="acme"),
        }
        # Regression (was a bug): the events API served every event whole, and a write
        # event lists its
        # files with per-column min/max statistics: the hidden ssn, the raw emails and
        # the note of the us row the filter excludes, all readable by the policy-bound
        # reader (GET /v1/events with or without super/table). The table detail drops
        # its min/max for such a caller, and the Iceberg REST catalog withholds the
        # table for the same reason ("the raw files would bypass them"); the events
        # route does neither.
        leaks = {
            name: sorted(value for value in forbidden if value in response.text)
            for name, response in responses.items()
        }
        assert leaks == {name: [] for name in responses}, leaks


def test_the_world_is_what_the_matrix_assumes(world: World) -> None:
    """The callers are who the model says they are (a wrong world would make every
    expectation above meaningless)."""
    w = world
    orgs = {who: w.call(who, "GET", "/v1/orgs") for who in WHO}
    for who, spec in WHO.items():
        r = orgs[who]
        if spec.auth_error:
            assert r.status_code == 401 and error_code(r) == spec.auth_error, (who, r.text)
            continue
        assert r.status_code == 200, (who, r.text)
        if spec.org is not None:
            me = [p for p in w.call(who, "GET", "/v1/principals").json() if p["id"] == w.pid[who]]
            assert me and me[0]["org"] == (spec.org or None) and me[0]["admin"] == spec.admin
            grants = {
                (g["role"], g["org"], g["super"] or "", g["table"] or "")
                for g in w.call(who, "GET", "/v1/grants").json()
                if g["principal_id"] == w.pid[who]
            }
            assert set(spec.grants) <= grants, (who, grants)
    roles = {
        r["name"]: r["permissions"] for r in w.admin("GET", "/v1/roles", params={"org": "acme"})
    }
    assert roles["loader"] == ["write"] and "retired" not in roles
    assert all(w.table(f"{o}/{s}/{t}") for o in ORGS for s in SUPERS for t in TABLES)
