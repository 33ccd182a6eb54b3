"""Who sees what through the Iceberg REST catalog (``/iceberg``): every catalog route
(with and without the ``orgs/<org>`` prefix), for every kind of caller, on namespaces
and tables in its scope and outside it.

The rules (README, "Delta Lake and Iceberg mirrors"; docs/design.md, "REST catalog"):
the catalog takes the /v1 bearer tokens and shows each principal only what it may
read; a namespace it cannot see is ``NoSuchNamespaceException`` (404), a table it may
not read ``NoSuchTableException`` (404, as for a table that does not exist); a table
whose row filters or masks apply to the caller is not served at all (its raw files
would bypass them); a loaded table carries the service's storage keys for platform
admins only (``config`` is ``{}`` for everyone else). Storage is S3, so that the keys
exist and a leak of them can be seen.

The catalog projection and the mirror runners are run to completion by ``Lake.sync()``
(the app runs no projector), as in the other mirror tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.api.iceberg_rest import ICEBERG_HANDLERS
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.mirror_lake import Lake

ORGS = ("acme", "other")
# Every table of the world: (org, super, table).
TABLES = [
    ("acme", "sales", "orders"),
    ("acme", "sales", "secret"),
    ("acme", "sales", "people"),
    ("acme", "ops", "orders"),
    ("other", "sales", "orders"),
]
SUPERS = {o: sorted({s for org, s, _ in TABLES if org == o}) for o in ORGS}
ROWS = [{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]
# acme/sales/people has a row filter for readers.
POLICY = {"role": "reader", "row_filter": "region = :principal.region"}
POLICIES: dict[tuple[str, str, str], set[str]] = {("acme", "sales", "people"): {"reader"}}

ROLE_PERMS: dict[str, frozenset[str]] = {
    "reader": frozenset({"read"}),
    "writer": frozenset({"read", "write"}),
    "org_admin": frozenset({"read", "write", "grant"}),
    "loader": frozenset({"write"}),  # a custom role of acme: write only
}
Grant = tuple[str, str, str, str]  # role, org, super, table


@dataclass(frozen=True)
class Who:
    org: str | None = None  # None: no principal (the static token, or no credential)
    admin: bool = False
    grants: tuple[Grant, ...] = ()
    unauthenticated: bool = False


WHO: dict[str, Who] = {
    "admin": Who(admin=True),  # LEDGERLAKE_API_TOKEN
    "root": Who(org="", admin=True),  # a platform-admin principal
    "acme_reader": Who("acme", grants=(("reader", "acme", "", ""),)),
    "acme_writer": Who("acme", grants=(("writer", "acme", "", ""),)),
    "acme_admin": Who("acme", grants=(("org_admin", "acme", "", ""),)),
    "table_reader": Who("acme", grants=(("reader", "acme", "sales", "orders"),)),
    "super_writer": Who("acme", grants=(("writer", "acme", "sales", ""),)),
    "loader": Who("acme", grants=(("loader", "acme", "sales", ""),)),
    "other_admin": Who("other", grants=(("org_admin", "other", "", ""),)),
    "nogrant": Who("acme"),
    "disabled": Who("acme", grants=(("reader", "acme", "", ""),), unauthenticated=True),
    "revoked": Who("acme", grants=(("reader", "acme", "", ""),), unauthenticated=True),
    "anonymous": Who(unauthenticated=True),
    "bogus": Who(unauthenticated=True),
}


# -- the model ------------------------------------------------------------------------


def covers(g: Grant, org: str, sup: str = "", table: str = "") -> bool:
    return g[1] == org and g[2] in ("", sup) and g[3] in ("", table)


def sees(who: Who, org: str, sup: str = "") -> bool:
    """A namespace (org or org.super) exists for a caller with a grant on, above or
    under it."""
    if who.admin:
        return True
    if who.org != org:
        return False
    return any(
        covers(g, org, sup) or (g[1] == org and (not sup or g[2] == sup)) for g in who.grants
    )


def can(who: Who, perm: str, org: str, sup: str, table: str) -> bool:
    return who.admin or any(
        perm in ROLE_PERMS[g[0]] and covers(g, org, sup, table) for g in who.grants
    )


def served(who: Who, org: str, sup: str, table: str) -> bool:
    """Readable, and no policy of the table applies to the caller (every role it has on
    the table has a policy; platform and org admins are never bound)."""
    if (org, sup, table) not in TABLES or not can(who, "read", org, sup, table):
        return False
    if who.admin or can(who, "grant", org, sup, table):
        return True
    roles = {g[0] for g in who.grants if covers(g, org, sup, table)}
    return not roles <= POLICIES.get((org, sup, table), set())


# -- the world ------------------------------------------------------------------------


class World:
    def __init__(self, client: TestClient[Any], settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.lake = Lake(client, settings)
        self.headers: dict[str, dict[str, str]] = {
            "admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            "anonymous": {},
            "bogus": {"Authorization": "Bearer llt_t_0123456789abcdef_forged-secret"},
        }
        self.pid: dict[str, str] = {}

    def call(
        self, who: str, method: str, path: str, *, params: Any = None, json: Any = None
    ) -> httpx.Response:
        return self.client.request(
            method, path, params=params, json=json, headers=self.headers[who]
        )

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = self.call("admin", method, path, **kw)
        assert r.is_success, (method, path, r.text)
        return r.json()


@pytest.fixture(scope="module")
def world(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, s3_server: Any
) -> Iterator[World]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("rest_authz") / "data",
        redis_url=redis_url,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        inline_max_rows=0,
        mirrors="iceberg",
        api_token=ADMIN_TOKEN,
        rate_limit_per_s=0,
        storage_url=f"s3://ll-{uuid.uuid4().hex[:12]}/prefix",
        s3_endpoint_url=s3_server.endpoint,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
    )
    app = create_app(settings, redis_url, run_projector=False)
    with TestClient(app) as client:
        w = World(client, settings)
        for org, sup, table in TABLES:
            w.admin("POST", f"/v1/{org}/{sup}/tables/{table}/rows", json=ROWS)
        w.admin("PUT", "/v1/acme/sales/tables/people/policies", json={"policies": [POLICY]})
        w.admin("PUT", "/v1/roles/loader", json={"org": "acme", "permissions": ["write"]})
        for name, who in WHO.items():
            if who.org is None:
                continue
            body: dict[str, Any] = {"admin": True} if who.admin else {"org": who.org}
            body |= {"name": name, "attributes": {"region": "eu"}}
            pid = w.admin("POST", "/v1/principals", json=body)["id"]
            w.pid[name] = pid
            for role, org, sup, table in who.grants:
                scope = {k: v for k, v in (("super", sup), ("table", table)) if v}
                grant = {"principal_id": pid, "role": role, "org": org, **scope}
                w.admin("POST", "/v1/grants", json=grant)
            issued = w.admin("POST", f"/v1/principals/{pid}/tokens", json={})
            w.headers[name] = {"Authorization": f"Bearer {issued['token']}"}
            if name == "revoked":
                w.admin("DELETE", f"/v1/tokens/{issued['id']}")
        w.admin("PATCH", f"/v1/principals/{w.pid['disabled']}", json={"disabled": True})
        w.lake.sync()
        yield w


# -- the cases ------------------------------------------------------------------------


@dataclass
class Cell:
    method: str
    path: str
    status: int
    kind: str | None = None  # the spec's error type, for a 404
    params: dict[str, str] | None = None
    on_success: Callable[[httpx.Response], None] | None = None


Build = Callable[[World, str, str], Cell]
CASES: dict[str, tuple[list[str], Build]] = {}


def case(route: str, targets: list[str]) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES[route] = (targets, build)
        return build

    return register


NO_NAMESPACE = "NoSuchNamespaceException"
NO_TABLE = "NoSuchTableException"
PREFIX = "/v1/orgs/{prefix:str}"
NAMESPACE = "/namespaces/{namespace:str}"


def not_found_or(ok: bool, status: int, kind: str) -> tuple[int, str | None]:
    return (status, None) if ok else (404, kind)


def base(prefixed_org: str | None) -> str:
    return f"/iceberg/v1/orgs/{prefixed_org}" if prefixed_org else "/iceberg/v1"


def check_config(_: World, who: str) -> Callable[[httpx.Response], None]:
    def ok(r: httpx.Response) -> None:
        body = r.json()
        assert body["defaults"] == {} and "endpoints" in body, body

    return ok


@case("GET /v1/config", ["-"])
def config_case(w: World, who: str, _: str) -> Cell:
    return Cell("GET", "/iceberg/v1/config", 200, on_success=check_config(w, who))


@case(f"GET {PREFIX}/config", list(ORGS))
def prefixed_config_case(w: World, who: str, org: str) -> Cell:
    return Cell("GET", f"/iceberg/v1/orgs/{org}/config", 200, on_success=check_config(w, who))


def namespaces_cell(who: str, prefixed_org: str | None, parent: str) -> Cell:
    """List namespaces: the orgs the caller sees, or the supers of a visible org."""
    spec = WHO[who]
    parts = ([prefixed_org] if prefixed_org else []) + (parent.split(".") if parent else [])
    if not parts:
        want = [[o] for o in ORGS if sees(spec, o)]
        visible = True
    else:
        visible = sees(spec, *parts)
        if len(parts) == 2:
            want = []
        else:
            supers = [s for s in SUPERS[parts[0]] if sees(spec, parts[0], s)]
            want = [[s] if prefixed_org else [parts[0], s] for s in supers]

    def ok(r: httpx.Response) -> None:
        assert r.json() == {"namespaces": want}, (r.json(), want)

    status, kind = not_found_or(visible, 200, NO_NAMESPACE)
    params = {"parent": parent} if parent else None
    return Cell("GET", f"{base(prefixed_org)}/namespaces", status, kind, params, ok)


@case("GET /v1/namespaces", ["", "acme", "other", "acme.sales", "acme.ops", "other.sales"])
def list_namespaces_case(w: World, who: str, parent: str) -> Cell:
    return namespaces_cell(who, None, parent)


@case(f"GET {PREFIX}/namespaces", ["acme", "other", "acme:sales", "acme:ops", "other:sales"])
def prefixed_list_namespaces_case(w: World, who: str, target: str) -> Cell:
    org, _, parent = target.partition(":")
    return namespaces_cell(who, org, parent)


NAMESPACES = ["acme", "acme.sales", "acme.ops", "other", "other.sales"]
PREFIXED_NAMESPACES = ["acme:sales", "acme:ops", "other:sales"]


def namespace_cell(who: str, method: str, prefixed_org: str | None, namespace: str) -> Cell:
    spec = WHO[who]
    parts = ([prefixed_org] if prefixed_org else []) + namespace.split(".")
    status, kind = not_found_or(sees(spec, *parts), 200 if method == "GET" else 204, NO_NAMESPACE)

    def ok(r: httpx.Response) -> None:
        if method == "GET":
            assert r.json() == {"namespace": namespace.split("."), "properties": {}}, r.text
        else:
            assert r.content == b"", r.content

    return Cell(method, f"{base(prefixed_org)}/namespaces/{namespace}", status, kind, None, ok)


@case(f"GET /v1{NAMESPACE}", NAMESPACES)
def load_namespace_case(w: World, who: str, namespace: str) -> Cell:
    return namespace_cell(who, "GET", None, namespace)


@case(f"HEAD /v1{NAMESPACE}", NAMESPACES)
def namespace_exists_case(w: World, who: str, namespace: str) -> Cell:
    return namespace_cell(who, "HEAD", None, namespace)


@case(f"GET {PREFIX}{NAMESPACE}", PREFIXED_NAMESPACES)
def prefixed_load_namespace_case(w: World, who: str, target: str) -> Cell:
    org, _, namespace = target.partition(":")
    return namespace_cell(who, "GET", org, namespace)


@case(f"HEAD {PREFIX}{NAMESPACE}", PREFIXED_NAMESPACES)
def prefixed_namespace_exists_case(w: World, who: str, target: str) -> Cell:
    org, _, namespace = target.partition(":")
    return namespace_cell(who, "HEAD", org, namespace)


def tables_cell(who: str, prefixed_org: str | None, namespace: str) -> Cell:
    """List tables: exactly those the caller may read and no policy binds it on."""
    spec = WHO[who]
    parts = ([prefixed_org] if prefixed_org else []) + namespace.split(".")
    shown = namespace.split(".")
    want = [
        {"namespace": shown, "name": t}
        for o, s, t in sorted(TABLES, key=lambda x: x[2])
        if len(parts) == 2 and [o, s] == parts and served(spec, o, s, t)
    ]

    def ok(r: httpx.Response) -> None:
        assert r.json() == {"identifiers": want}, (r.json(), want)

    status, kind = not_found_or(sees(spec, *parts), 200, NO_NAMESPACE)
    path = f"{base(prefixed_org)}/namespaces/{namespace}/tables"
    return Cell("GET", path, status, kind, None, ok)


@case(f"GET /v1{NAMESPACE}/tables", NAMESPACES)
def list_tables_case(w: World, who: str, namespace: str) -> Cell:
    return tables_cell(who, None, namespace)


@case(f"GET {PREFIX}{NAMESPACE}/tables", PREFIXED_NAMESPACES)
def prefixed_list_tables_case(w: World, who: str, target: str) -> Cell:
    org, _, namespace = target.partition(":")
    return tables_cell(who, org, namespace)


TABLE_TARGETS = [".".join(t) for t in TABLES] + ["acme.sales.nosuch"]


def table_cell(w: World, who: str, method: str, target: str, prefixed: bool) -> Cell:
    spec = WHO[who]
    org, sup, table = target.split(".")
    if not sees(spec, org, sup):
        status, kind = 404, NO_NAMESPACE
    else:
        ok_status = 200 if method == "GET" else 204
        status, kind = not_found_or(served(spec, org, sup, table), ok_status, NO_TABLE)
    path = (
        f"/iceberg/v1/orgs/{org}/namespaces/{sup}/tables/{table}"
        if prefixed
        else f"/iceberg/v1/namespaces/{org}.{sup}/tables/{table}"
    )

    def ok(r: httpx.Response) -> None:
        if method == "HEAD":
            assert r.content == b"", r.content
            return
        body = r.json()
        assert body["metadata"]["location"].endswith(f"{org}/{sup}/{table}"), body["metadata"]
        assert body["metadata-location"].endswith(".metadata.json"), body
        s = w.settings
        assert s.s3_secret_access_key and s.s3_access_key_id
        if spec.admin:  # the service's own keys, so it needs none of its own
            assert body["config"]["s3.access-key-id"] == s.s3_access_key_id, body["config"]
            assert body["config"]["s3.secret-access-key"] == s.s3_secret_access_key
        else:  # those keys reach every org's files: none for anyone else
            assert body["config"] == {}, body["config"]
            assert s.s3_secret_access_key not in r.text and s.s3_access_key_id not in r.text

    return Cell(method, path, status, kind, None, ok)


@case(f"GET /v1{NAMESPACE}/tables/{{table:str}}", TABLE_TARGETS)
def load_table_case(w: World, who: str, target: str) -> Cell:
    return table_cell(w, who, "GET", target, prefixed=False)


@case(f"HEAD /v1{NAMESPACE}/tables/{{table:str}}", TABLE_TARGETS)
def table_exists_case(w: World, who: str, target: str) -> Cell:
    return table_cell(w, who, "HEAD", target, prefixed=False)


@case(f"GET {PREFIX}{NAMESPACE}/tables/{{table:str}}", TABLE_TARGETS)
def prefixed_load_table_case(w: World, who: str, target: str) -> Cell:
    return table_cell(w, who, "GET", target, prefixed=True)


@case(f"HEAD {PREFIX}{NAMESPACE}/tables/{{table:str}}", TABLE_TARGETS)
def prefixed_table_exists_case(w: World, who: str, target: str) -> Cell:
    return table_cell(w, who, "HEAD", target, prefixed=True)


REPORT = {"report-type": "scan-report", "table-name": "orders", "snapshot-id": 1}


def metrics_cell(target: str, prefixed: bool) -> Cell:
    """Scan reports are accepted and dropped, whatever the table: 204 tells nothing."""
    org, sup, table = target.split(".")
    path = (
        f"/iceberg/v1/orgs/{org}/namespaces/{sup}/tables/{table}/metrics"
        if prefixed
        else f"/iceberg/v1/namespaces/{org}.{sup}/tables/{table}/metrics"
    )

    def ok(r: httpx.Response) -> None:
        assert r.content == b"", r.content

    return Cell("POST", path, 204, on_success=ok)


@case(f"POST /v1{NAMESPACE}/tables/{{table:str}}/metrics", TABLE_TARGETS)
def metrics_case(w: World, who: str, target: str) -> Cell:
    return metrics_cell(target, prefixed=False)


@case(f"POST {PREFIX}{NAMESPACE}/tables/{{table:str}}/metrics", TABLE_TARGETS)
def prefixed_metrics_case(w: World, who: str, target: str) -> Cell:
    return metrics_cell(target, prefixed=True)


# -- the tests ------------------------------------------------------------------------

ROUTES = sorted(
    f"{method} {path}"
    for handler in ICEBERG_HANDLERS
    for path in handler.paths
    for method in handler.http_methods
)


def run(w: World, who: str, target: str, cell: Cell) -> list[str]:
    where = f"{who} @ {target}: {cell.method} {cell.path}"
    kw: dict[str, Any] = {"json": REPORT} if cell.method == "POST" else {}
    r = w.call(who, cell.method, cell.path, params=cell.params, **kw)
    if WHO[who].unauthenticated:
        ok = r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
        return [] if ok else [f"{where}: expected 401, got {r.status_code} {r.text[:200]}"]
    if r.status_code != cell.status:
        return [f"{where}: expected {cell.status} {cell.kind or ''}, got {r.status_code} {r.text}"]
    if cell.kind is not None and cell.method != "HEAD":
        error = r.json()["error"]
        if (error["type"], error["code"]) != (cell.kind, 404):
            return [f"{where}: expected {cell.kind}, got {error}"]
    if r.is_success and cell.on_success is not None:
        try:
            cell.on_success(r)
        except AssertionError as exc:
            return [f"{where}: {exc}"]
    return []


def test_the_matrix_has_a_row_per_catalog_route() -> None:
    assert sorted(CASES) == ROUTES


@pytest.mark.parametrize("route", ROUTES)
def test_rest_route_matrix(world: World, route: str) -> None:
    entry = CASES.get(route)
    assert entry is not None, f"{route} has no row in the Iceberg REST matrix (CASES)"
    targets, build = entry
    problems: list[str] = []
    for who in WHO:
        for target in targets:
            problems += run(world, who, target, build(world, who, target))
    assert not problems, f"{len(problems)} cells:\n" + "\n".join(problems)


def test_what_each_caller_is_served(world: World) -> None:
    """The matrix's model, spelled out: the tables each caller may load."""
    w = world
    expected = {
        "admin": {".".join(t) for t in TABLES},
        "root": {".".join(t) for t in TABLES},
        "acme_reader": {"acme.sales.orders", "acme.sales.secret", "acme.ops.orders"},
        "acme_writer": {"acme.sales.orders", "acme.sales.secret", "acme.sales.people",
                        "acme.ops.orders"},
        "acme_admin": {"acme.sales.orders", "acme.sales.secret", "acme.sales.people",
                       "acme.ops.orders"},
        "table_reader": {"acme.sales.orders"},
        "super_writer": {"acme.sales.orders", "acme.sales.secret", "acme.sales.people"},
        "loader": set(),
        "other_admin": {"other.sales.orders"},
        "nogrant": set(),
    }  # fmt: skip
    for who, want in expected.items():
        got = {
            ".".join(t)
            for t in TABLES
            if w.call(who, "GET", f"/iceberg/v1/namespaces/{t[0]}.{t[1]}/tables/{t[2]}").status_code
            == 200
        }
        assert got == want, who
        assert {".".join(t) for t in TABLES if served(WHO[who], *t)} == want, who


def test_a_hidden_table_is_answered_like_a_missing_one(world: World) -> None:
    w = world
    for path in (
        "/iceberg/v1/namespaces/acme.sales/tables/{t}",
        "/iceberg/v1/orgs/acme/namespaces/sales/tables/{t}",
    ):
        hidden = w.call("table_reader", "GET", path.format(t="secret"))
        missing = w.call("table_reader", "GET", path.format(t="nosuch"))
        assert hidden.status_code == missing.status_code == 404
        said, unknown = hidden.json()["error"], missing.json()["error"]
        assert said["type"] == unknown["type"] == NO_TABLE
        assert said["message"].replace("secret", "nosuch") == unknown["message"]
    # Another tenant's namespace: as one that does not exist.
    hidden = w.call("acme_admin", "GET", "/iceberg/v1/namespaces/other.sales/tables")
    missing = w.call("acme_admin", "GET", "/iceberg/v1/namespaces/nope.sales/tables")
    assert hidden.status_code == missing.status_code == 404
    said, unknown = hidden.json()["error"], missing.json()["error"]
    assert said["type"] == unknown["type"] == NO_NAMESPACE
    assert said["message"].replace("other", "nope") == unknown["message"]


def test_a_policy_withdraws_the_table_from_the_callers_it_binds(world: World) -> None:
    """PUT .../policies for readers: at once no longer listed nor loaded for a reader
    (the mirror has not changed), still for a writer; back when the policy goes."""
    w = world
    policies = "/v1/acme/ops/tables/orders/policies"
    load = "/iceberg/v1/namespaces/acme.ops/tables/orders"
    listed = "/iceberg/v1/namespaces/acme.ops/tables"
    assert w.call("acme_reader", "GET", load).status_code == 200
    masked = {"role": "reader", "masks": {"region": "hash"}}
    w.admin("PUT", policies, json={"policies": [masked]})
    try:
        r = w.call("acme_reader", "GET", load)
        assert r.status_code == 404 and r.json()["error"]["type"] == NO_TABLE, r.text
        assert w.call("acme_reader", "HEAD", load).status_code == 404
        assert w.call("acme_reader", "GET", listed).json() == {"identifiers": []}
        assert w.call("acme_writer", "GET", load).status_code == 200
        assert w.call("acme_admin", "GET", load).status_code == 200
        w.lake.sync()  # and after the mirror caught up with the new version
        assert w.call("acme_reader", "GET", load).status_code == 404
        assert w.call("acme_writer", "GET", load).status_code == 200
    finally:
        w.admin("PUT", policies, json={"policies": []})
        w.lake.sync()
    assert w.call("acme_reader", "GET", load).status_code == 200


def test_every_401_has_the_spec_error_type(world: World) -> None:
    """Clients map errors by status and type: every refused credential is the spec's
    NotAuthorizedException, whatever made it invalid."""
    w = world
    for who in ("anonymous", "bogus", "revoked", "disabled"):
        r = w.call(who, "GET", "/iceberg/v1/namespaces")
        assert r.status_code == 401, (who, r.text)
        # Regression (was a bug): only a missing or malformed token got the spec's type; a
        # revoked token
        # or a disabled principal is answered with the internal class name
        # "Unauthorized" (iceberg_error_body maps only the code "unauthorized", not
        # token_revoked / token_expired / principal_disabled / invalid_jwt ...).
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"],
            "type": "NotAuthorizedException",
            "code": 401,
        }, (who, r.text)
