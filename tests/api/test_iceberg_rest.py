"""The Iceberg REST catalog under ``/iceberg``, driven by real clients (pyiceberg's
REST catalog and DuckDB's iceberg extension) against a real uvicorn server.

Writes go through the HTTP API (httpx); the catalog projection and the mirror runners
are run to completion by ``Server.sync()`` (the server itself runs no projector), so
what the catalog serves is deterministic. On S3 the clients get no storage settings of
their own: they read the files with what the catalog vends with a loaded table.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import duckdb
import httpx
import msgspec
import pytest
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError, UnauthorizedError

from app.api.app import create_app
from app.services import Services
from app.settings import Settings
from projections.query.extensions import install_extensions
from tests.support.threaded_server import ThreadedServer

ORG, SUP, TBL = "acme", "sales", "orders"
TOKEN = "iceberg-test-token"
DUCK_EXTENSIONS = ("httpfs", "avro", "iceberg")
# Credentials a client could find on its own: removed, so that S3 reads can only
# succeed with what the catalog vends.
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
)

FIRST: list[dict[str, Any]] = [
    {"id": 1, "name": "alpha", "amount": 9.5, "paid": True},
    {"id": 2, "name": "beta", "amount": 3.0, "paid": False},
    {"id": 3, "name": None, "amount": -1.25, "paid": True},
]
SECOND: list[dict[str, Any]] = [
    {"id": 4, "name": "delta", "amount": 100.0, "paid": False, "note": "late"},
    {"id": 5, "name": "epsilon", "amount": 0.5, "paid": None, "note": None},
]

Row = tuple[Any, ...]


# -- the server -------------------------------------------------------------------------


class Server(ThreadedServer):
    """The app (no projector: ``sync`` runs the projections) under uvicorn."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        super().__init__(
            create_app(settings, settings.redis_url, run_projector=False), settings.api_token
        )
        self.uri = f"{self.base}/iceberg"

    def sync(self) -> int:
        """Run the catalog projection and every mirror runner until caught up."""

        async def run() -> int:
            async with Services.open(self.settings) as services:
                return await services.catch_up()

        return anyio.run(run)

    # -- the Ledgerlake API

    def write(
        self, rows: list[dict[str, Any]], table: str = TBL, org: str = ORG, sup: str = SUP
    ) -> int:
        r = self.http.post(f"/v1/{org}/{sup}/tables/{table}/rows", json=rows)
        assert r.status_code == 200, r.text
        return int(r.json()["version"])

    def query(self, sql: str) -> tuple[list[str], list[Row]]:
        r = self.http.post(f"/v1/{ORG}/{SUP}/query", json={"sql": sql})
        assert r.status_code == 200, r.text
        body = r.json()
        return [c["name"] for c in body["columns"]], [tuple(row) for row in body["rows"]]

    def iceberg(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, f"/iceberg/v1{path}", **kw)


@pytest.fixture
def serve() -> Iterator[Callable[[Settings], Server]]:
    """Start servers on given settings (mirrors on); all are stopped at teardown."""
    started: list[Server] = []

    def start(settings: Settings, **changes: Any) -> Server:
        settings = msgspec.structs.replace(settings, mirrors="delta,iceberg", **changes)
        server = Server(settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


@pytest.fixture(scope="session")
def duck_ext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("iceberg_rest_duckdb_ext")
    install_extensions(d, DUCK_EXTENSIONS)
    return d


# -- the clients ------------------------------------------------------------------------


def catalog(
    server: Server, warehouse: str | None = None, token: str | None = None, **props: str
) -> Catalog:
    """pyiceberg's REST catalog: nothing but the URI (and the warehouse, the token:
    the server's admin token unless given; "" for none at all)."""
    kw: dict[str, Any] = dict(props)
    if warehouse is not None:
        kw["warehouse"] = warehouse
    if token is None:
        token = server.settings.api_token
    if token:
        kw["token"] = token
    else:
        kw["auth"] = {"type": "noop"}
    return load_catalog("ledgerlake", type="rest", uri=server.uri, **kw)


def pyiceberg_rows(cat: Catalog, ident: str) -> tuple[list[str], list[Row]]:
    arrow = cat.load_table(ident).scan().to_arrow()
    return list(arrow.column_names), sorted(tuple(r.values()) for r in arrow.to_pylist())


def duck(ext_dir: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the shipped extensions (installed offline) and no
    S3 secret of its own."""
    con = duckdb.connect(
        ":memory:",
        config={
            "extension_directory": str(ext_dir),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        },
    )
    for name in DUCK_EXTENSIONS:
        con.execute(f"LOAD {name}")
    return con


def duck_attach(
    con: duckdb.DuckDBPyConnection,
    server: Server,
    warehouse: str,
    *,
    nested: bool = False,
    secret: str | None = None,
) -> None:
    opts = ["TYPE iceberg", f"ENDPOINT '{server.uri}'"]
    if secret is None and server.settings.api_token:  # the server's admin token
        token = server.settings.api_token
        con.execute(f"CREATE OR REPLACE SECRET ll_admin (TYPE iceberg, TOKEN '{token}')")
        secret = "ll_admin"
    opts.append(f"SECRET {secret}" if secret else "AUTHORIZATION_TYPE 'none'")
    if nested:
        opts.append("SUPPORT_NESTED_NAMESPACES true")
    con.execute(f"ATTACH '{warehouse}' AS c ({', '.join(opts)})")


def duck_rows(con: duckdb.DuckDBPyConnection, ref: str) -> tuple[list[str], list[Row]]:
    cur = con.execute(f"select * from {ref}")
    names = [d[0] for d in cur.description]
    return names, sorted(cur.fetchall())


def expected(rows: list[dict[str, Any]], columns: list[str]) -> list[Row]:
    return sorted(tuple(r.get(c) for c in columns) for r in rows)


def ledgerlake_rows(server: Server, table: str = TBL) -> tuple[list[str], list[Row]]:
    names, rows = server.query(f"select * from {table}")
    return names, sorted(rows)


def assert_spec_error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["type"] == kind, error
    assert error["code"] == status, error
    assert isinstance(error["message"], str) and error["message"].strip(), error


def raw_head(server: Server, path: str, token: str | None = None) -> tuple[int, bytes, bytes]:
    """HEAD over a plain socket: status, header block and every byte after it (the
    connection is closed by the server, so a body sent by mistake shows up). With the
    server's admin token unless given ("" for none)."""
    token = server.settings.api_token if token is None else token
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        request = f"HEAD /iceberg/v1{path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, rest


def vended_config(server: Server, path: str) -> dict[str, str]:
    r = server.iceberg("GET", path)
    assert r.status_code == 200, r.text
    config: dict[str, str] = r.json()["config"]
    return config


def check_vended(server: Server, config: dict[str, str]) -> None:
    """The S3 settings a client needs, equal to the service's own; nothing on local."""
    s = server.settings
    if s.storage_url is None:
        assert config == {}
        return
    assert config["s3.endpoint"] == s.s3_endpoint_url
    assert config["s3.access-key-id"] == s.s3_access_key_id
    assert config["s3.secret-access-key"] == s.s3_secret_access_key
    assert config["s3.path-style-access"] == "true"
    assert config["s3.region"] == config["client.region"] == "us-east-1"


# -- reading through the catalog --------------------------------------------------------


def test_two_level_namespaces_pyiceberg_and_duckdb_read_the_written_rows(
    any_settings: Settings, serve: Callable[..., Server], duck_ext_dir: Path, no_aws_env: None
) -> None:
    server = serve(any_settings)
    v1 = server.write(FIRST)
    server.write([{"id": 10, "kind": "x"}], table="shipments", sup="ops")
    server.sync()

    cat = catalog(server)
    assert cat.list_namespaces() == [("acme",)]
    assert cat.list_namespaces("acme") == [("acme", "ops"), ("acme", "sales")]
    assert cat.list_namespaces("acme.sales") == []
    assert cat.list_tables("acme.sales") == [("acme", "sales", "orders")]
    assert cat.list_tables("acme.ops") == [("acme", "ops", "shipments")]
    assert cat.list_tables("acme") == []
    assert cat.table_exists("acme.sales.orders")
    assert cat.namespace_exists("acme.sales")

    columns = ["id", "name", "amount", "paid"]
    want = (columns, expected(FIRST, columns))
    assert ledgerlake_rows(server) == want
    assert pyiceberg_rows(cat, "acme.sales.orders") == want
    table = cat.load_table("acme.sales.orders")
    check_vended(server, vended_config(server, "/namespaces/acme.sales/tables/orders"))
    assert table.metadata.properties["ledgerlake.version"] == str(v1)

    con = duck(duck_ext_dir)
    try:
        duck_attach(con, server, "", nested=True)
        tables = con.execute("select schema_name, table_name from duckdb_tables()").fetchall()
        assert sorted(tables) == [("acme.ops", "shipments"), ("acme.sales", "orders")]
        assert duck_rows(con, 'c."acme.sales".orders') == want
    finally:
        con.close()

    # A second write adds a column: until the mirror publishes it, the catalog still
    # serves the first version; after the sync, the new one with the new column.
    v2 = server.write(SECOND)
    assert v2 > v1
    assert pyiceberg_rows(cat, "acme.sales.orders") == want
    server.sync()
    columns2 = [*columns, "note"]
    want2 = (columns2, expected(FIRST + SECOND, columns2))
    assert ledgerlake_rows(server) == want2
    reloaded = cat.load_table("acme.sales.orders")
    assert reloaded.metadata_location != table.metadata_location
    assert reloaded.metadata.properties["ledgerlake.version"] == str(v2)
    assert pyiceberg_rows(cat, "acme.sales.orders") == want2
    con = duck(duck_ext_dir)
    try:
        duck_attach(con, server, "", nested=True)
        assert duck_rows(con, 'c."acme.sales".orders') == want2
    finally:
        con.close()


def test_warehouse_prefix_one_level_namespaces_pyiceberg_and_duckdb(
    any_settings: Settings, serve: Callable[..., Server], duck_ext_dir: Path, no_aws_env: None
) -> None:
    server = serve(any_settings)
    server.write(FIRST)
    server.write([{"id": 1}], table="other", org="beta")  # another org stays out of view
    server.sync()

    cat = catalog(server, warehouse=ORG)
    assert cat.properties["prefix"] == f"orgs/{ORG}"
    assert cat.list_namespaces() == [("sales",)]
    assert cat.list_namespaces("sales") == []
    assert cat.list_tables("sales") == [("sales", "orders")]
    assert cat.table_exists("sales.orders")
    assert not cat.table_exists("sales.other")

    columns = ["id", "name", "amount", "paid"]
    want = (columns, expected(FIRST, columns))
    assert ledgerlake_rows(server) == want
    assert pyiceberg_rows(cat, "sales.orders") == want
    check_vended(server, vended_config(server, "/orgs/acme/namespaces/sales/tables/orders"))

    con = duck(duck_ext_dir)
    try:
        duck_attach(con, server, ORG)
        tables = con.execute("select schema_name, table_name from duckdb_tables()").fetchall()
        assert tables == [("sales", "orders")]
        assert duck_rows(con, "c.sales.orders") == want
    finally:
        con.close()

    server.write(SECOND)
    server.sync()
    columns2 = [*columns, "note"]
    want2 = (columns2, expected(FIRST + SECOND, columns2))
    assert pyiceberg_rows(cat, "sales.orders") == want2
    con = duck(duck_ext_dir)
    try:
        duck_attach(con, server, ORG)
        assert duck_rows(con, "c.sales.orders") == want2
    finally:
        con.close()


def test_only_published_tables_are_listed(settings: Settings, serve: Callable[..., Server]) -> None:
    server = serve(settings)
    server.write(FIRST)
    cat = catalog(server)
    # Written, but no mirror published yet: the namespace exists, the table does not.
    assert cat.namespace_exists("acme.sales")
    assert cat.list_tables("acme.sales") == []
    assert not cat.table_exists("acme.sales.orders")
    with pytest.raises(NoSuchTableError):
        cat.load_table("acme.sales.orders")
    server.sync()
    assert cat.list_tables("acme.sales") == [("acme", "sales", "orders")]
    assert cat.load_table("acme.sales.orders").scan().to_arrow().num_rows == len(FIRST)


def test_dropped_table_disappears_and_a_new_one_under_its_name_shows_only_new_rows(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    server = serve(settings)
    server.write(FIRST)
    server.write([{"id": 1}], table="keep")
    server.sync()
    cat = catalog(server)
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep"), ("acme", "sales", "orders")]

    r = server.http.delete(f"/v1/{ORG}/{SUP}/tables/{TBL}")
    assert r.status_code in (200, 204), r.text
    server.sync()
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep")]
    assert not cat.table_exists("acme.sales.orders")
    with pytest.raises(NoSuchTableError, match="NoSuchTableException"):
        cat.load_table("acme.sales.orders")
    assert_spec_error(
        server.iceberg("GET", "/namespaces/acme.sales/tables/orders"), 404, "NoSuchTableException"
    )
    assert raw_head(server, "/namespaces/acme.sales/tables/orders")[::2] == (404, b"")

    # The name is free again: a new table under it, with another schema. Its mirror
    # is unpublished until the sync (the old one's must not stand in), then only the
    # new rows are there.
    server.write([{"code": "z", "qty": 7}])
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep")]
    server.sync()
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep"), ("acme", "sales", "orders")]
    assert pyiceberg_rows(cat, "acme.sales.orders") == (["code", "qty"], [("z", 7)])


def test_table_without_iceberg_mirror_is_not_listed(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    server = serve(settings)
    server.write(FIRST)
    server.write([{"id": 1}], table="keep")
    server.sync()
    cat = catalog(server)
    assert cat.table_exists("acme.sales.orders")

    r = server.http.put(f"/v1/{ORG}/{SUP}/tables/{TBL}/mirrors", json={"formats": ["delta"]})
    assert r.status_code == 200, r.text
    server.sync()
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep")]
    assert not cat.table_exists("acme.sales.orders")
    with pytest.raises(NoSuchTableError):
        cat.load_table("acme.sales.orders")
    assert_spec_error(
        server.iceberg("GET", "/namespaces/acme.sales/tables/orders"), 404, "NoSuchTableException"
    )
    # Ledgerlake itself still has the table.
    assert ledgerlake_rows(server)[1] == expected(FIRST, ["id", "name", "amount", "paid"])

    # Turned back on: published again, with every row.
    r = server.http.put(
        f"/v1/{ORG}/{SUP}/tables/{TBL}/mirrors", json={"formats": ["delta", "iceberg"]}
    )
    assert r.status_code == 200, r.text
    server.sync()
    assert cat.list_tables("acme.sales") == [("acme", "sales", "keep"), ("acme", "sales", "orders")]
    assert pyiceberg_rows(cat, "acme.sales.orders")[1] == expected(
        FIRST, ["id", "name", "amount", "paid"]
    )


# -- the protocol, raw ------------------------------------------------------------------


def test_config_namespaces_and_metrics_raw(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    server = serve(settings)
    server.write(FIRST)
    server.write([{"id": 1}], table="shipments", sup="ops")
    server.write([{"id": 1}], table="t", org="beta", sup="main")
    server.sync()

    config = server.iceberg("GET", "/config").json()
    assert config["defaults"] == {} and config["overrides"] == {}
    assert "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}" in config["endpoints"]
    assert "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}" in config["endpoints"]
    prefixed = server.iceberg("GET", "/config", params={"warehouse": ORG}).json()
    assert prefixed["overrides"] == {"prefix": f"orgs/{ORG}"}

    def get(path: str, **kw: Any) -> Any:
        r = server.iceberg("GET", path, **kw)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    assert get("/namespaces") == {"namespaces": [["acme"], ["beta"]]}
    want = {"namespaces": [["acme", "ops"], ["acme", "sales"]]}
    assert get("/namespaces", params={"parent": "acme"}) == want
    assert get("/namespaces", params={"parent": "acme.sales"}) == {"namespaces": []}
    assert get("/namespaces", params={"parent": "acme\x1fsales"}) == {"namespaces": []}
    for encoded in ("acme.sales", "acme%1Fsales", "acme%1fsales"):
        assert get(f"/namespaces/{encoded}") == {"namespace": ["acme", "sales"], "properties": {}}
        identifiers = [{"namespace": ["acme", "sales"], "name": "orders"}]
        assert get(f"/namespaces/{encoded}/tables") == {"identifiers": identifiers}
        body = get(f"/namespaces/{encoded}/tables/orders")
        assert body["metadata"]["location"].endswith("acme/sales/orders")
        assert body["metadata-location"].endswith(".metadata.json")
        assert body["config"] == {}
    assert get("/namespaces/acme") == {"namespace": ["acme"], "properties": {}}
    assert get("/namespaces/acme/tables") == {"identifiers": []}

    # With the org as prefix: one-level namespaces.
    assert get("/orgs/acme/namespaces") == {"namespaces": [["ops"], ["sales"]]}
    assert get("/orgs/acme/namespaces", params={"parent": "sales"}) == {"namespaces": []}
    assert get("/orgs/acme/namespaces/sales") == {"namespace": ["sales"], "properties": {}}
    identifiers = [{"namespace": ["sales"], "name": "orders"}]
    assert get("/orgs/acme/namespaces/sales/tables") == {"identifiers": identifiers}
    prefixed_load = get("/orgs/acme/namespaces/sales/tables/orders")
    assert prefixed_load == get("/namespaces/acme.sales/tables/orders")

    for path in (
        "/namespaces/acme.sales",
        "/orgs/acme/namespaces/sales",
        "/namespaces/acme.sales/tables/orders",
        "/orgs/acme/namespaces/sales/tables/orders",
    ):
        assert raw_head(server, path)[::2] == (204, b"")

    report = {"report-type": "scan-report", "table-name": "orders", "snapshot-id": 1}
    for path in (
        "/namespaces/acme.sales/tables/orders/metrics",
        "/orgs/acme/namespaces/sales/tables/orders/metrics",
    ):
        r = server.iceberg("POST", path, json=report)
        assert r.status_code == 204, r.text
        assert r.content == b""


UNKNOWN = [
    ("/namespaces/nope", "NoSuchNamespaceException"),
    ("/namespaces/acme.nope", "NoSuchNamespaceException"),
    ("/namespaces/acme.sales.orders", "NoSuchNamespaceException"),  # three levels
    ("/namespaces/acme%1Fsales%1Forders", "NoSuchNamespaceException"),
    ("/namespaces/acme.", "NoSuchNamespaceException"),
    ("/namespaces/acme..sales", "NoSuchNamespaceException"),
    ("/namespaces/nope.sales/tables", "NoSuchNamespaceException"),
    ("/namespaces/acme.sales.orders/tables", "NoSuchNamespaceException"),
    ("/namespaces/acme.sales/tables/nope", "NoSuchTableException"),
    ("/namespaces/acme/tables/orders", "NoSuchTableException"),  # org level: no tables
    ("/namespaces/acme.nope/tables/orders", "NoSuchNamespaceException"),
    ("/namespaces/acme.sales.orders/tables/orders", "NoSuchNamespaceException"),
    ("/orgs/acme/namespaces/sales.orders", "NoSuchNamespaceException"),  # three levels
    ("/orgs/acme/namespaces/nope", "NoSuchNamespaceException"),
    ("/orgs/acme/namespaces/sales/tables/nope", "NoSuchTableException"),
    ("/orgs/acme/namespaces/sales.orders/tables/orders", "NoSuchNamespaceException"),
    ("/orgs/nope/namespaces", "NoSuchNamespaceException"),
    ("/orgs/nope/namespaces/sales/tables/orders", "NoSuchNamespaceException"),
]


def test_unknown_names_are_404_with_the_spec_error_shape(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    server = serve(settings)
    server.write(FIRST)
    server.sync()
    failures = []
    for path, kind in UNKNOWN:
        try:
            assert_spec_error(server.iceberg("GET", path), 404, kind)
            if "/namespaces/" in path and not path.endswith("/tables"):  # HEAD: no listings
                status, head, rest = raw_head(server, path)
                assert status == 404, head
                assert rest == b"", rest
        except AssertionError as exc:
            failures.append(f"{path}: {exc}")
    assert not failures, "\n".join(failures)


def test_pyiceberg_raises_no_such_namespace_and_table(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    server = serve(settings)
    server.write(FIRST)
    server.sync()
    cat = catalog(server)
    with pytest.raises(NoSuchNamespaceError, match="NoSuchNamespaceException"):
        cat.list_tables("acme.nope")
    with pytest.raises(NoSuchNamespaceError, match="NoSuchNamespaceException"):
        cat.list_namespaces("nope")
    with pytest.raises(NoSuchNamespaceError, match="NoSuchNamespaceException"):
        cat.load_namespace_properties("acme.sales.orders")
    with pytest.raises(NoSuchTableError, match="NoSuchTableException"):
        cat.load_table("acme.sales.nope")
    with pytest.raises(NoSuchTableError):
        cat.load_table("acme.nope.orders")
    assert not cat.namespace_exists("acme.nope")
    assert not cat.table_exists("acme.sales.nope")
    assert cat.load_namespace_properties("acme.sales") == {}

    prefixed = catalog(server, warehouse=ORG)
    with pytest.raises(NoSuchTableError, match="NoSuchTableException"):
        prefixed.load_table("sales.nope")
    with pytest.raises(NoSuchNamespaceError, match="NoSuchNamespaceException"):
        prefixed.list_tables("nope")
    assert not prefixed.namespace_exists("nope")


def test_write_requests_get_the_spec_error_shape(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    """The catalog is read-only; a client that tries to write must still get an
    error it can parse."""
    server = serve(settings)
    server.write(FIRST)
    server.sync()
    for method, path in [
        ("POST", "/namespaces"),
        ("POST", "/namespaces/acme.sales/tables"),
        ("DELETE", "/namespaces/acme.sales/tables/orders"),
        ("POST", "/namespaces/acme.sales/tables/orders"),
        ("GET", "/namespaces/acme.sales/tables/orders/credentials"),
    ]:
        r = server.iceberg(method, path, json={"namespace": ["x"], "name": "x"})
        assert 400 <= r.status_code < 500, r.text
        # Regression: requests that match no /iceberg handler (405 for the spec's
        # write endpoints, 404 for unknown paths) used to get Ledgerlake's own error
        # shape, which pyiceberg reports as "Received unexpected JSON Payload".
        error = r.json()["error"]
        assert error.get("code") == r.status_code and isinstance(error.get("type"), str), (
            method,
            path,
            r.text,
        )
    with pytest.raises(Exception) as raised:
        catalog(server).create_namespace("acme.new")
    assert "unexpected JSON Payload" not in str(raised.value)


def test_org_named_like_a_route_segment_is_served_in_prefix_mode(
    settings: Settings, serve: Callable[..., Server]
) -> None:
    """Org names are any lowercase identifier, so ``warehouse=namespaces`` is a
    valid catalog: ``/iceberg/v1/namespaces/namespaces`` must list its supers."""
    server = serve(settings)
    for org in ("config", "namespaces"):
        server.write(FIRST, org=org)
    server.sync()
    columns = ["id", "name", "amount", "paid"]
    cat = catalog(server, warehouse="config")
    assert cat.list_namespaces() == [("sales",)]
    assert pyiceberg_rows(cat, "sales.orders") == (columns, expected(FIRST, columns))
    # Regression: with the org itself as the prefix, /v1/namespaces/namespaces was the
    # unprefixed load_namespace route. The prefix is now orgs/<org>.
    r = server.iceberg("GET", "/orgs/namespaces/namespaces")
    assert r.json() == {"namespaces": [["sales"]]}, r.text
    cat = catalog(server, warehouse="namespaces")
    assert cat.list_tables("sales") == [("sales", "orders")]
    assert pyiceberg_rows(cat, "sales.orders") == (columns, expected(FIRST, columns))


# -- credentials and auth ---------------------------------------------------------------


def test_credentials_off_vends_an_empty_config(
    any_settings: Settings, serve: Callable[..., Server], no_aws_env: None
) -> None:
    server = serve(any_settings, iceberg_rest_credentials=False)
    server.write(FIRST)
    server.sync()
    assert vended_config(server, "/namespaces/acme.sales/tables/orders") == {}
    assert vended_config(server, "/orgs/acme/namespaces/sales/tables/orders") == {}

    # Clients bring their own storage settings.
    s = server.settings
    own: dict[str, str] = {}
    if s.storage_url is not None:
        assert s.s3_endpoint_url and s.s3_access_key_id and s.s3_secret_access_key
        own = {
            "s3.endpoint": s.s3_endpoint_url,
            "s3.access-key-id": s.s3_access_key_id,
            "s3.secret-access-key": s.s3_secret_access_key,
            "s3.region": "us-east-1",
            "s3.force-virtual-addressing": "false",
        }
    if s.s3_secret_access_key:  # nothing secret anywhere in the response
        r = server.iceberg("GET", "/namespaces/acme.sales/tables/orders")
        assert s.s3_secret_access_key not in r.text
    cat = catalog(server, **own)
    columns = ["id", "name", "amount", "paid"]
    assert pyiceberg_rows(cat, "acme.sales.orders") == (columns, expected(FIRST, columns))


def test_api_token_guards_the_catalog(
    settings: Settings, serve: Callable[..., Server], duck_ext_dir: Path
) -> None:
    server = serve(settings, api_token=TOKEN)
    server.write(FIRST)
    server.sync()

    paths = [
        "/config",
        "/namespaces",
        "/namespaces/acme.sales/tables/orders",
        "/orgs/acme/namespaces/sales/tables",
    ]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        for path in paths:
            r = httpx.get(f"{server.uri}/v1{path}", headers=headers)
            assert_spec_error(r, 401, "NotAuthorizedException")
            assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.head(f"{server.uri}/v1/namespaces/acme.sales/tables/orders")
    assert r.status_code == 401

    with pytest.raises(UnauthorizedError, match="NotAuthorizedException"):
        catalog(server, token="")
    with pytest.raises(UnauthorizedError, match="NotAuthorizedException"):
        catalog(server, token="wrong")

    columns = ["id", "name", "amount", "paid"]
    want = (columns, expected(FIRST, columns))
    cat = catalog(server, token=TOKEN)
    assert cat.list_tables("acme.sales") == [("acme", "sales", "orders")]
    assert pyiceberg_rows(cat, "acme.sales.orders") == want
    assert pyiceberg_rows(catalog(server, warehouse=ORG, token=TOKEN), "sales.orders") == want

    con = duck(duck_ext_dir)
    try:
        with pytest.raises(duckdb.Error, match="401"):
            duck_attach(con, server, ORG, secret="")
            con.execute("select * from c.sales.orders").fetchall()
    finally:
        con.close()
    con = duck(duck_ext_dir)
    try:
        con.execute("CREATE SECRET wrong_token (TYPE iceberg, TOKEN 'wrong')")
        with pytest.raises(duckdb.Error, match="401"):
            duck_attach(con, server, ORG, secret="wrong_token")
            con.execute("select * from c.sales.orders").fetchall()
    finally:
        con.close()
    con = duck(duck_ext_dir)
    try:
        con.execute(f"CREATE SECRET ll_token (TYPE iceberg, TOKEN '{TOKEN}')")
        duck_attach(con, server, ORG, secret="ll_token")
        assert duck_rows(con, "c.sales.orders") == want
    finally:
        con.close()
