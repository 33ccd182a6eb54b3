"""Finished query connections kept for reuse, keyed by exactly what they show."""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from projections.query.types import (
    Restricted,
    ViewSource,
)


def views_key(views: dict[str, ViewSource]) -> tuple[object, ...]:
    """What a query connection shows: each view's name, its table version (the event
    that made it, in its incarnation) and its policy. Two queries of one super with
    equal keys see exactly the same data through exactly the same views (the pool key
    adds the super: stream ids repeat across supers)."""
    out: list[object] = []
    for name in sorted(views):
        source = views[name]
        if isinstance(source, Restricted):
            t = source.table
            out.append((name, t.incarnation, t.last_event_id, source.select, source.where))
        else:
            out.append((name, source.incarnation, source.last_event_id, None, None))
    return tuple(out)


# A pooled connection is set up again after this long: its S3 credentials (a secret
# made when it was opened) may be short-lived.
POOLED_MAX_AGE_S = 60.0


@dataclass
class Pooled:
    con: duckdb.DuckDBPyConnection
    temp_dir: Path
    opened: float = field(default_factory=time.monotonic)
    serial: int = 0  # which connection of its process this is (for watching reuse)

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class ConnectionPool:
    """Idle query connections, by the views they hold (``views_key``), least recently
    used first out. Setting a connection up (the database, the sandbox, the views and
    their files' footers) cost more than most queries; a connection is only ever used
    by one query at a time, and only for the same views, so reusing it changes nothing
    a query can see. A table's new version is a new key: the old ones age out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: OrderedDict[Hashable, list[Pooled]] = OrderedDict()
        self.count = 0
        self.closed = False
        self.lock = threading.Lock()

    def take(self, key: Hashable) -> Pooled | None:
        with self.lock:
            free = self.idle.get(key)
            if not free:
                return None
            pooled = free.pop()
            self.count -= 1
            if not free:
                del self.idle[key]
        if time.monotonic() - pooled.opened > POOLED_MAX_AGE_S:
            pooled.close()
            return None
        return pooled

    def give(self, key: Hashable, pooled: Pooled) -> bool:
        """Keep ``pooled`` for the next query of ``key`` (evicting the least recently
        used); False if the pool keeps nothing."""
        if self.size <= 0:
            return False
        evicted: list[Pooled] = []
        with self.lock:
            if self.closed:
                return False  # the engine closed: a query that ended late closes its own
            self.idle.setdefault(key, []).append(pooled)
            self.idle.move_to_end(key)
            self.count += 1
            while self.count > self.size:
                oldest, free = next(iter(self.idle.items()))
                evicted.append(free.pop(0))
                self.count -= 1
                if not free:
                    del self.idle[oldest]
        for old in evicted:
            old.close()
        return True

    def held(self) -> list[Hashable]:
        """The keys of the idle connections, least recently used first."""
        with self.lock:
            return list(self.idle)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle = [p for free in self.idle.values() for p in free]
            self.idle.clear()
            self.count = 0
        for pooled in idle:
            pooled.close()
