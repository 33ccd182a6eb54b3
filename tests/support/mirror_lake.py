"""The ``Lake`` of the mirror tests: the API (without background projections) and
``sync()``, which runs every projection until caught up, so what the mirrors hold is
deterministic. The fixtures that open one are in tests/mirrors/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
from litestar.testing import TestClient

from app.api.app import create_app
from app.services import Services
from app.settings import Settings
from tests.conftest import authed


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
