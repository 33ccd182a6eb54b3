"""The resolver of the current version of every table (no time travel)."""

from __future__ import annotations

from events.errors import InvalidInput
from projections.catalog import SuperState
from projections.query.types import (
    Analysis,
    Resolver,
    ViewSource,
)


def current_views(state: SuperState) -> Resolver:
    """A resolver showing the current version of every table (no time travel)."""

    async def resolve(analysis: Analysis) -> dict[str, ViewSource]:
        views: dict[str, ViewSource] = {}
        for ref in analysis.refs:
            if ref.version is not None or ref.time is not None:
                raise InvalidInput("time travel is not available here", code="invalid_time_travel")
            if ref.name in state.tables:
                views[ref.view] = state.tables[ref.name]
        return views

    return resolve
