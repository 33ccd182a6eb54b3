"""Fuzz every operation of the OpenAPI document against a real ``ledgerlake serve``,
once as the platform admin (the static token) and once as a reader of the seeded org
(a principal's API token).

A case fails on a 5xx, on a status, content type, header or body its operation does
not document, and on a refused request (4xx) that changed anything: an event in any
stream of the deployment (but the query audit) or a data file added or removed.

Each operation gets ``LEDGERLAKE_FUZZ_EXAMPLES`` (default 25) generated cases per
caller, positive and negative (schema-breaking) ones, derandomized so a run is
repeatable. For a longer hunt: ``LEDGERLAKE_FUZZ_EXAMPLES=500 .venv/bin/python -m
pytest -n 2 tests/fuzz``, and ``LEDGERLAKE_FUZZ_SEED=<n>`` for other cases.

Nothing is excluded: the MCP endpoint (``/mcp``, which could stream) is not in the
document, queries are bounded by the server's ``LEDGERLAKE_QUERY_MAX_TIMEOUT_S=10``, and
what would destroy the setup is steered away by the hints (tests/fuzz/hints.py): a
table drop only ever names the droppable table, and the tokens, principals and grants a
case may revoke, disable or remove are a victim's, never the caller's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.app import create_app
from app.settings import Settings
from tests.fuzz import hints
from tests.fuzz.world import World, diff, start_world

EXAMPLES = int(os.environ.get("LEDGERLAKE_FUZZ_EXAMPLES", "25"))
# Unset: the same cases every run (CI); set: other cases, e.g. for a longer hunt.
SEED = int(os.environ["LEDGERLAKE_FUZZ_SEED"]) if "LEDGERLAKE_FUZZ_SEED" in os.environ else None
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ROLES = ("admin", "reader")


def _operations() -> list[str]:
    """Every operation of the document (the app's own, built without a server), sorted:
    the document's order varies between processes, and xdist workers must agree."""
    app = create_app(Settings(data_dir=Path("unused"), api_token="x"), "redis://unused")
    document = msgspec.to_builtins(app.openapi_schema.to_schema())
    methods = ("get", "put", "post", "delete", "patch")
    ops = document["paths"].items()
    return sorted(f"{m.upper()} {p}" for p, by_method in ops for m in by_method if m in methods)


# -- the servers ----------------------------------------------------------------------


class Worlds:
    """One seeded server per caller, started on its first case and kept for the session
    (an xdist worker may get the cases of both callers, in any order)."""

    def __init__(self, redis_url: str, tmp: pytest.TempPathFactory) -> None:
        self.redis_url, self.tmp = redis_url, tmp
        self.running: dict[str, tuple[World, Iterator[World], Any]] = {}

    def get(self, role: str) -> tuple[World, Any]:
        """The world of ``role`` and the schema loaded from its server."""
        if role not in self.running:
            gen = start_world(role, self.redis_url, self.tmp.mktemp(role))
            world = next(gen)
            try:
                schema = _schema(world)
            except BaseException:
                gen.close()  # stops its server now, not whenever it is collected
                raise
            self.running[role] = (world, gen, schema)
        world, _, schema = self.running[role]
        return world, schema

    def close(self) -> None:
        for _, gen, _ in self.running.values():
            gen.close()


@pytest.fixture(scope="session")
def worlds(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worlds]:
    w = Worlds(redis_url, tmp_path_factory)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _schema(world: World) -> Any:
    """The document as the live server serves it, with the hints."""
    config = schemathesis.Config.from_dict({"generation": {"max-examples": EXAMPLES}})
    schema = schemathesis.openapi.from_url(
        f"{world.url}/schema/openapi.json", config=config, headers=world.auth
    )
    hints.register(schema, world)
    return schema


# -- the test -------------------------------------------------------------------------


@pytest.mark.parametrize("label", _operations())
@pytest.mark.parametrize("role", ROLES)
def test_operation(role: str, label: str, worlds: Worlds, http: requests.Session) -> None:
    world, schema = worlds.get(role)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        check_case(world, http, case)

    if SEED is not None:
        run = seed(SEED)(run)
    run()


def check_case(world: World, http: requests.Session, case: schemathesis.Case) -> None:
    """Send the case and check the answer, and that a refusal changed nothing."""
    world.ensure_doomed()
    before = world.state()
    response = case.call(base_url=world.url, session=http, headers=world.auth)
    changed = diff(before, world.state()) if 400 <= response.status_code < 500 else []

    def refused_requests_change_nothing(ctx: Any, response: Any, case: Any) -> None:
        if changed:
            raise AssertionError(
                f"refused with {response.status_code}, yet changed:\n" + "\n".join(changed)
            )

    def server_log_of_an_error(ctx: Any, response: Any, case: Any) -> None:
        if response.status_code >= 500:  # (not_a_server_error fails it; this says why)
            tail = world.server.stderr().splitlines()[-30:]
            raise AssertionError("the server's log ends with:\n" + "\n".join(tail))

    checks = [*CHECKS, refused_requests_change_nothing, server_log_of_an_error]
    case.validate_response(response, checks=checks, headers=world.auth)


def test_the_change_check_sees_an_event_and_a_file(worlds: Worlds) -> None:
    """The check of refusals can fail: an accepted write shows in both parts."""
    world, _ = worlds.get("admin")
    before = world.state()
    with world.admin() as c:
        r = c.post("/v1/acme/sales/tables/orders/rows", json=[{"id": 7, "region": "eu"}])
    assert r.status_code == 200, r.text
    changed = diff(before, world.state())
    assert any(line.startswith("stream ") and ":{acme/sales}:events" in line for line in changed)
    assert any(line.startswith("new file acme/sales/orders/data/") for line in changed)
