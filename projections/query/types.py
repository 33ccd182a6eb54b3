"""What the query engine takes and gives: limits, results and plans, the checked
statement (``Analysis``: the tables it names, with their time travel), and the views a
resolver hands the engine (a table version, or one under a policy).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from projections.catalog import TableState


@dataclass(frozen=True)
class QueryLimits:
    default_rows: int = 1000
    max_rows: int = 100_000
    default_timeout_s: float = 30.0
    max_timeout_s: float = 300.0
    max_result_bytes: int = 64 * 1024 * 1024
    threads: int = 2
    memory_limit: str = "2GB"
    max_temp_bytes: str = "8GB"
    max_sql_chars: int = 100_000
    # How many leading rows a query may skip (``offset``, for paging through results).
    max_offset: int = 10_000_000
    concurrency: int = 4
    # How long past its timeout a query that does not react to the interrupt is waited
    # for before its worker process is killed (and the client gets its 408).
    grace_s: float = 0.5
    # The address space (RLIMIT_AS) of each query worker process, bytes; 0: no limit.
    worker_address_space: int = 8 * 2**30


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    truncated: bool
    elapsed_ms: float


@dataclass(frozen=True)
class QueryPlan:
    """A query bound and planned, not run: its result schema (no rows), the tables it
    reads and DuckDB's physical plan."""

    schema: pa.Schema
    tables: frozenset[str]
    plan: str


@dataclass(frozen=True)
class TableRef:
    """A table a query reads: its current version (``version`` and ``time`` None), or
    the version named by ``t AT (VERSION => n)`` / ``t AT (TIMESTAMP => '...')``."""

    name: str
    version: int | None = None
    time: datetime | None = None

    @property
    def view(self) -> str:
        """The name the query reads this table under."""
        if self.version is not None:
            return f"__ll_{self.name}_at_v{self.version}"
        if self.time is not None:
            return f"__ll_{self.name}_at_t{int(self.time.timestamp() * 1_000_000)}"
        return self.name


@dataclass(frozen=True)
class Analysis:
    """A checked query: the tables it reads and the SQL to run (rewritten only when it
    names past versions, which become views of their own)."""

    refs: frozenset[TableRef]
    sql: str

    @property
    def tables(self) -> set[str]:
        return {r.name for r in self.refs}


@dataclass(frozen=True)
class Restricted:
    """A table seen through a policy: ``select`` (the visible, masked columns) of the
    rows where ``where`` holds. Both are SQL built and validated by the caller."""

    table: TableState
    select: str
    where: str


ViewSource = TableState | Restricted


Resolver = Callable[[Analysis], Awaitable[dict[str, ViewSource]]]
"""Maps each view name of an analysed query to the table version it shows."""
