"""Fixtures for the mirror tests: the API without background projections (each test
runs the catalog projection and the mirror runners to completion itself, so what the
mirrors hold is deterministic), with both mirror formats on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest
from litestar.testing import TestClient

from app.api.app import create_app
from app.services import Services
from app.settings import Settings
from tests.conftest import authed

# polars plans Iceberg scans with pyiceberg unless an optional plugin is installed; say
# so instead of warning in every test.
os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")


@pytest.fixture
def mirror_settings(any_settings: Settings) -> Settings:
    return msgspec.structs.replace(any_settings, mirrors="delta,iceberg")


@pytest.fixture
def local_mirror_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, mirrors="delta,iceberg")


class Lake:
    """The API client plus ``sync()``: run every projection until caught up."""

    def __init__(self, client: TestClient[Any], settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def sync(self) -> int:
        async def run() -> int:
            async with Services.open(self.settings) as services:
                return await services.catch_up()

        return anyio.run(run)


def open_lake(settings: Settings) -> Iterator[Lake]:
    assert settings.redis_url
    app = create_app(settings, settings.redis_url, run_projector=False)
    with authed(TestClient(app)) as client:
        yield Lake(client, settings)


@pytest.fixture
def lake(mirror_settings: Settings) -> Iterator[Lake]:
    yield from open_lake(mirror_settings)


@pytest.fixture
def local_lake(local_mirror_settings: Settings) -> Iterator[Lake]:
    yield from open_lake(local_mirror_settings)
