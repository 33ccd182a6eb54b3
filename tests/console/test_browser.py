"""The console in a real headless Chromium against a real ``ledgerlake serve``: sign in,
browse to a table, query from the editor, page, download CSV, sign out; and what a
reader of one org sees."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pyarrow as pa
import pytest

from tests.console.conftest import snap
from tests.support.principals import member
from tests.support.processes import Server, cli_env

TOKEN = "console-test-admin-token"
pytestmark = pytest.mark.slow


@pytest.fixture
def server(start_server: Any, tmp_path: Path) -> Server:
    env = cli_env(api_token=TOKEN, mirrors="none", archive="false")
    started: Server = start_server(tmp_path / "data", env)
    with started.client() as client:
        rows = [
            {"id": i, "region": ["eu", "us", "apac"][i % 3], "amount": i * 1.5} for i in range(250)
        ]
        assert client.post("/v1/acme/sales/tables/orders/rows", json=rows).status_code == 200
        other = [{"secret": "globex-only"}]
        assert client.post("/v1/globex/hq/tables/payroll/rows", json=other).status_code == 200
    return started


def sign_in(page: Any, server: Server, path: str, token: str) -> None:
    page.goto(server.url + path)
    snap(page, "sign-in")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(server.url + path.split("#")[0])))


def grid_rows(page: Any, name: str) -> list[list[str]]:
    table = page.get_by_role("table", name=name)
    table.wait_for()
    return [
        [c.inner_text() for c in row.locator("td").all()] for row in table.locator("tbody tr").all()
    ]


def test_sign_in_browse_query_page_download_and_sign_out(page: Any, server: Server) -> None:
    # A bookmarked table page: sign in first, then back to it.
    sign_in(page, server, "/console/acme/sales/tables/orders", TOKEN)
    page.get_by_role("heading", name="orders").wait_for()
    schema = grid_rows(page, "Schema")
    assert [r[:2] for r in schema] == [["id", "int64"], ["region", "string"], ["amount", "float64"]]
    assert len(grid_rows(page, "Sample")) == 20
    snap(page, "table")

    # The catalog lists the table; the search box narrows it down.
    page.get_by_role("link", name="Ledgerlake").click()
    page.get_by_role("link", name="orders").wait_for()
    snap(page, "catalog")
    search = page.get_by_label("Search tables and columns")
    search.fill("nothing-like-this")
    page.get_by_text("No table matches.").wait_for()
    search.fill("ord")
    page.get_by_role("link", name="orders").wait_for()
    search.fill("regi")  # a column's name finds its table, and says which column
    page.get_by_role("cell", name="region", exact=True).wait_for()
    assert page.get_by_role("link", name="orders").count() == 1
    assert page.get_by_role("link", name="payroll").count() == 0
    search.fill("")

    # The SQL editor: the query lives in the URL's fragment; Run fills the grid.
    sql = "select region, count(*) n from orders group by region order by region"
    page.goto(f"{server.url}/console/acme/sales/sql#{quote(sql)}")
    assert page.get_by_label("SQL").input_value() == sql
    page.get_by_role("button", name="Run").click()
    page.get_by_text("3 rows from row 1").wait_for()
    assert grid_rows(page, "Results") == [["apac", "83"], ["eu", "84"], ["us", "83"]]
    # A chart of the result in two clicks: the axes default to the first column and
    # the last numeric one.
    page.get_by_role("button", name="Bar chart").click()
    bars = page.get_by_role("img", name="bar chart of n by region")
    assert bars.locator("rect").count() == 3
    heights = [
        float(h)
        for h in bars.locator("rect").evaluate_all("rs => rs.map(r => r.getAttribute('height'))")
    ]
    assert heights[1] > heights[0] == heights[2]  # eu's 84 over the others' 83
    page.get_by_role("button", name="Line chart").click()
    assert page.get_by_role("img", name="line chart of n by region").locator("circle").count() == 3
    snap(page, "sql")

    # Ctrl+Enter runs too, and the grid pages through a larger result.
    editor = page.get_by_label("SQL")
    editor.fill("select id from orders order by id")
    page.get_by_label("Rows per page").fill("100")
    editor.press("Control+Enter")
    page.get_by_text("100 rows from row 1 (more follow)").wait_for()
    assert grid_rows(page, "Results")[0] == ["0"]
    page.get_by_role("button", name="Next page").click()
    page.get_by_text("100 rows from row 101").wait_for()
    assert grid_rows(page, "Results")[0] == ["100"]

    # A bad query is an error on the page, with its code.
    editor.fill("select nope from orders")
    page.get_by_role("button", name="Run").click()
    assert "nope" in page.get_by_role("alert").inner_text()

    # Download CSV: the whole page of rows, as the API's CSV.
    editor.fill("select id, region from orders where id < 5 order by id")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    text = Path(info.value.path()).read_text()
    assert list(csv.reader(io.StringIO(text))) == [
        ["id", "region"], ["0", "eu"], ["1", "us"], ["2", "apac"], ["3", "eu"], ["4", "us"]
    ]  # fmt: skip

    # Arrow too, sorting the page by a column, the plan, and a past version.
    with page.expect_download() as info:
        page.get_by_role("button", name="Download Arrow").click()
    arrow = pa.ipc.open_stream(Path(info.value.path()).read_bytes()).read_all()
    assert arrow.column("id").to_pylist() == [0, 1, 2, 3, 4]
    page.get_by_role("button", name="Run").click()
    page.get_by_text("5 rows from row 1").wait_for()
    page.get_by_role("button", name="region").click()
    assert [r[1] for r in grid_rows(page, "Results")] == ["apac", "eu", "eu", "us", "us"]
    page.get_by_role("button", name="region").click()
    assert [r[1] for r in grid_rows(page, "Results")] == ["us", "us", "eu", "eu", "apac"]
    page.get_by_role("button", name="Plan").click()
    assert "orders" in page.get_by_label("Plan").inner_text()
    editor.fill("select count(*) n from orders")
    page.get_by_label("As of version").fill("0")  # created, still empty
    page.get_by_role("button", name="Run").click()
    page.get_by_text("1 row from row 1").wait_for()
    assert grid_rows(page, "Results") == [["0"]]
    page.get_by_label("As of version").fill("")

    # The platform admin's admin page also has the effective settings (secrets
    # redacted) and the health.
    page.goto(server.url + "/console/admin")
    settings = grid_rows(page, "Settings")
    assert ["api_token", "***"] in settings and TOKEN not in page.content()
    assert '"status"' in page.get_by_label("Health").inner_text()

    # Sign out: the session is over, the pages ask to sign in again.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Token").wait_for()
    page.goto(server.url + "/console")
    page.get_by_role("button", name="Sign in").wait_for()


def test_a_wrong_token_is_told_and_a_reader_sees_only_its_org(page: Any, server: Server) -> None:
    page.goto(server.url + "/console")
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert "invalid bearer token" in page.get_by_role("alert").inner_text()

    with server.client() as admin:
        token = member(admin, "ann", "acme", "reader")["token"]
    sign_in(page, server, "/console", token)
    page.get_by_role("link", name="orders").wait_for()
    assert "globex" not in page.content() and "payroll" not in page.content()
    # Another org's table by URL: not found, and nothing of it shown.
    page.goto(server.url + "/console/globex/hq/tables/payroll")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "not" in alert.inner_text() and "globex-only" not in page.content()


def test_events_arrive_live_and_history_restores(page: Any, server: Server) -> None:
    sign_in(page, server, "/console/acme/events?super=sales", TOKEN)
    page.get_by_text("Following new events live.").wait_for()
    assert grid_rows(page, "Events")[0][1] == "RowsAppended"
    before = len(grid_rows(page, "Events"))
    with server.client() as client:
        client.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 1000, "region": "eu"}])
    page.wait_for_function(
        f"document.querySelectorAll('table[aria-label=Events] tbody tr').length > {before}"
    )
    newest = grid_rows(page, "Events")[0]
    assert newest[1:4] == ["RowsAppended", "sales", "orders"] and newest[6] == "1"
    # The filters narrow the rows down in place.
    page.get_by_label("Event type").fill("TableCreated")
    visible = page.locator("table[aria-label=Events] tbody tr:not([hidden])")
    assert visible.count() == 1
    page.get_by_label("Event type").fill("")
    snap(page, "events")

    # History: versions newest first; a past version's rows; restore it (confirmed).
    page.goto(server.url + "/console/acme/sales/tables/orders/history")
    versions = grid_rows(page, "Versions")
    assert [v[0] for v in versions] == ["2", "1", "0"]  # 0: created, empty
    page.get_by_role("button", name="Open version 1", exact=True).click()
    assert len(grid_rows(page, "Rows of version 1")) == 100
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Restore version 1", exact=True).click()
    page.get_by_text("Restored version 1 as version 3.").wait_for()
    snap(page, "history")
    with server.client() as client:
        count = client.post("/v1/acme/sales/query", json={"sql": "select count(*) from orders"})
    assert count.json()["rows"] == [[250]]


def test_an_org_admin_issues_and_revokes_a_token_and_a_reader_sees_no_admin(
    page: Any, server: Server
) -> None:
    with server.client() as admin:
        boss_token = member(admin, "boss", "acme", "org_admin")["token"]
        ann_token = member(admin, "ann", "acme", "reader")["token"]
        made = admin.post("/v1/principals", json={"name": "gus", "kind": "user", "org": "globex"})
        other = made.json()

    sign_in(page, server, "/console", boss_token)
    page.get_by_role("link", name="Admin").click()
    page.get_by_role("heading", name="Principals, tokens and grants").wait_for()
    assert "gus" not in page.content() and other["id"] not in page.content()
    page.get_by_label("Name of a new token for ann").fill("ci")
    page.get_by_role("button", name="Issue a token for ann").click()
    issued = page.get_by_label("New token", exact=True).inner_text()
    assert issued.startswith("llt_")
    snap(page, "admin")
    # The new token works; then revoked from the page, it no longer does.
    assert (
        httpx.get(
            f"{server.url}/v1/whoami", headers={"Authorization": f"Bearer {issued}"}
        ).status_code
        == 200
    )
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke ci").click()
    page.get_by_role("button", name="Revoke ci").wait_for(state="detached")
    assert (
        httpx.get(
            f"{server.url}/v1/whoami", headers={"Authorization": f"Bearer {issued}"}
        ).status_code
        == 401
    )

    # A grant added from the page, then removed.
    page.get_by_label("Role for ann").select_option("writer")
    page.get_by_label("Super for ann").fill("sales")
    page.get_by_role("button", name="Add the grant for ann").click()
    page.get_by_role("button", name="Remove writer on acme/sales").wait_for()
    with server.client() as admin:
        roles = {(g["role"], g["super"]) for g in admin.get("/v1/grants").json()}
    assert ("writer", "sales") in roles
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove writer on acme/sales").click()
    page.get_by_role("button", name="Remove writer on acme/sales").wait_for(state="detached")
    with server.client() as admin:
        roles = {(g["role"], g["super"]) for g in admin.get("/v1/grants").json()}
    assert ("writer", "sales") not in roles
    assert page.get_by_role("table", name="Settings").count() == 0  # platform admins only

    # A reader: no Admin link, and the admin page by URL shows nothing of it.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, server, "/console", ann_token)
    page.get_by_role("link", name="orders").wait_for()
    assert page.get_by_role("link", name="Admin").count() == 0
    page.goto(server.url + "/console/admin")
    page.get_by_role("heading", name="Not found").wait_for()
    assert "Issue a token" not in page.content()
