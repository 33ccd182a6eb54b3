"""Watching the query worker processes an engine starts."""

from __future__ import annotations

import threading

from projections.query.engine import QueryEngine
from projections.query.workers import Worker


class Starts:
    """The workers ``engine`` starts, in order, and an event set once the first has."""

    def __init__(self, engine: QueryEngine) -> None:
        self.workers: list[Worker] = []
        self.first = threading.Event()
        engine.workers.on_start = self._started

    def _started(self, worker: Worker) -> None:
        self.workers.append(worker)
        self.first.set()
