"""Completeness: every setting and every route is documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

from app.api.iceberg_rest import ICEBERG_HANDLERS
from app.api.routes import V1_HANDLERS
from app.api.routes.health import health, metrics
from app.api.routes.principals import ADMIN_HANDLERS
from app.settings import SETTINGS_DOC, Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `LEDGERLAKE_([A-Z0-9_]+)` \|", README, flags=re.M))
    fields = {name.upper() for name in Settings.__struct_fields__}
    assert documented == fields
    assert set(SETTINGS_DOC) == set(Settings.__struct_fields__)


def test_every_route_is_in_the_readme() -> None:
    handlers = [health, metrics, *V1_HANDLERS, *ADMIN_HANDLERS]
    for handler in handlers:
        for path in handler.paths:
            shown = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
            assert f" {shown}" in README, shown
    for handler in ICEBERG_HANDLERS:
        for path in handler.paths:
            shown = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
            if "{prefix}" not in shown:
                assert f" /iceberg{shown}" in README, shown
