"""What the chaos clients were told: every acknowledged write with its ids and values,
the writes given up on, the failed attempts by kind, the faults injected by kind and
every anomaly a client saw on the way (a wrong answer, a rejection). Thread-safe: the
writers, the readers and the fault injector share one ``Ledger``."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ABSENT = None  # the state of a key that was deleted (or never written)


@dataclass(frozen=True)
class Batch:
    """One logical append: the ids of its rows (all or none must be in the table)."""

    key: str
    ids: tuple[int, ...]


@dataclass
class KeyState:
    """What a key's row must be: one value if every change of it was acknowledged, any
    of several after a change given up on (it may or may not have been applied)."""

    allowed: set[int | None] = field(default_factory=lambda: {ABSENT})


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.batches: list[Batch] = []  # acknowledged appends
        self.unsure: list[Batch] = []  # appends given up on
        self.keys: dict[int, KeyState] = {}
        self.acked_rows = 0
        self.max_version: dict[str, int] = {}
        self.writes = Counter[str]()  # acknowledged, by kind (append, upsert, delete)
        self.replayed = 0  # acknowledged by a retry that the first attempt had applied
        self.resent = 0  # acknowledged writes sent once more on purpose (must replay)
        self.retried = 0  # acknowledged writes that needed more than one attempt
        self.gave_up = 0
        self.failures = Counter[str]()  # failed write attempts, by kind
        self.read_failures = Counter[str]()
        self.reads = 0
        self.faults = Counter[str]()
        self.anomalies: list[str] = []
        self.finished = 0  # logical writes done (acknowledged or given up)
        # Writers start no write past this many finished ones until the injector moves
        # it on, so that every fault strikes while writes are in flight.
        self.gate = float("inf")
        self.lost = -1  # acknowledged writes missing or wrong at the end (-1: not counted)
        self.duplicates = -1  # rows present more than once at the end

    # -- writes -----------------------------------------------------------------------

    def failed(self, kind: str) -> None:
        with self._lock:
            self.failures[kind] += 1
            self._lock.notify_all()

    def acked(self, kind: str, table: str, answer: dict[str, Any], attempts: int) -> None:
        with self._lock:
            self.writes[kind] += 1
            self.replayed += bool(answer.get("replayed"))
            self.retried += attempts > 1
            self.max_version[table] = max(self.max_version.get(table, 0), answer["version"])

    def resent_one(self) -> None:
        with self._lock:
            self.resent += 1

    def appended(self, batch: Batch) -> None:
        with self._lock:
            self.batches.append(batch)
            self.acked_rows += len(batch.ids)
            self._done()

    def changed(self, values: dict[int, int | None], sure: bool) -> None:
        """Keys set to a value (None: deleted); ``sure`` unless the change was given up."""
        with self._lock:
            for k, value in values.items():
                state = self.keys.setdefault(k, KeyState())
                state.allowed = {value} if sure else state.allowed | {value}
            self._done()

    def given_up(self, what: str, batch: Batch | None = None) -> None:
        with self._lock:
            self.gave_up += 1
            self.anomalies.append(f"given up after every retry: {what}")
            if batch is not None:
                self.unsure.append(batch)
                self._done()

    def anomaly(self, text: str) -> None:
        with self._lock:
            self.anomalies.append(text)

    def _done(self) -> None:
        self.finished += 1
        self._lock.notify_all()

    # -- what readers and the injector look at ----------------------------------------

    def floor(self, table: str) -> tuple[int, int]:
        """(rows acknowledged, highest version acknowledged) so far: a read that starts
        now must see at least these."""
        with self._lock:
            return self.acked_rows, self.max_version.get(table, 0)

    def read_ok(self) -> None:
        with self._lock:
            self.reads += 1

    def read_failed(self, kind: str) -> None:
        with self._lock:
            self.read_failures[kind] += 1

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def failed_attempts(self) -> int:
        with self._lock:
            return sum(self.failures.values())

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Block until ``predicate(ledger)`` holds (checked on every change) or timeout."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: predicate(self), timeout=timeout))

    def set_gate(self, gate: float) -> None:
        with self._lock:
            self.gate = gate
            self._lock.notify_all()

    def pass_gate(self, timeout: float) -> bool:
        """Wait until a writer may start its next write (False: timed out)."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: self.finished < self.gate, timeout=timeout))

    def notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {
                "acknowledged": sum(self.writes.values()),
                "by_kind": dict(sorted(self.writes.items())),
                "rows_acknowledged": self.acked_rows,
                "retried": self.retried,
                "replayed": self.replayed,
                "resent": self.resent,
                "gave_up": self.gave_up,
                "failed_attempts": dict(sorted(self.failures.items())),
                "reads": self.reads,
                "failed_reads": dict(sorted(self.read_failures.items())),
                "faults": dict(sorted(self.faults.items())),
                "lost": self.lost,
                "duplicates": self.duplicates,
            }
