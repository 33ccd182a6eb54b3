"""Fixtures for the mirror tests: the API without background projections (each test
runs the catalog projection and the mirror runners to completion itself, so what the
mirrors hold is deterministic), with both mirror formats on."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec
import pytest

from app.settings import Settings
from tests.support.mirror_lake import Lake, open_lake

# polars plans Iceberg scans with pyiceberg unless an optional plugin is installed; say
# so instead of warning in every test.
os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")


@pytest.fixture
def mirror_settings(any_settings: Settings) -> Settings:
    return msgspec.structs.replace(any_settings, mirrors="delta,iceberg")


@pytest.fixture
def local_mirror_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, mirrors="delta,iceberg")


@pytest.fixture
def lake(mirror_settings: Settings) -> Iterator[Lake]:
    yield from open_lake(mirror_settings)


@pytest.fixture
def local_lake(local_mirror_settings: Settings) -> Iterator[Lake]:
    yield from open_lake(local_mirror_settings)
