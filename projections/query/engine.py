"""Read-only SQL over a super's tables through DuckDB, with safety enforced by the engine.

Each query gets a throwaway in-memory DuckDB database in which every table of the super
is a view over exactly its current Parquet files. Before the user's SQL runs:

* file access is limited to those files (``allowed_paths`` + ``enable_external_access``
  off): ``read_csv('/etc/passwd')``, ``glob``, ``COPY``, ``ATTACH`` fail in the engine;
* extensions cannot be installed or loaded, and the configuration is locked, so ``SET``
  cannot undo any of it;
* the statement must be one SELECT according to DuckDB's own parser *and* a query
  expression according to sqlglot (which also rejects PRAGMA/SHOW/DESCRIBE, which DuckDB
  rewrites into SELECTs);
* results are streamed up to a row and byte limit, and a timer interrupts the query at
  its timeout.

Queries run in worker processes (``workers``) under operating-system limits: a query
that does not stop at its interrupt is killed with its worker a moment later.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import duckdb
import msgspec
import pyarrow as pa

from events.errors import InvalidInput, LedgerError, QueryTimeout, Unavailable
from projections.catalog import SuperState
from projections.query.analysis import analyze_sql
from projections.query.current import current_views
from projections.query.extensions import install_extensions
from projections.query.pool import views_key
from projections.query.sandbox import base_connection
from projections.query.types import (
    Analysis,
    QueryLimits,
    QueryPlan,
    QueryResult,
    Resolver,
    Restricted,
    ViewSource,
)
from projections.query.wire import EngineConfig, Job, View
from projections.query.workers import Overtime, WorkerDied, WorkerGone, WorkerPool, lost_error

_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True)
class _Job:
    """One query for an engine thread: its views, checked SQL and limits."""

    views: dict[str, ViewSource]
    analysis: Analysis
    limit: int
    timeout: float
    offset: int
    plan_only: bool
    # The org/super the views belong to: part of the pool key (stream ids, hence the
    # views' versions, repeat across supers). None: the connection is not pooled.
    scope: str | None = None


class QueryEngine:
    """Runs checked SQL against a super's snapshot."""

    def __init__(
        self,
        resolve_path: Callable[[str], str],
        limits: QueryLimits,
        temp_root: Path,
        *,
        s3_secret: Callable[[], dict[str, str] | None] | None = None,
        extension_dir: Path | None = None,
    ) -> None:
        self.resolve_path = resolve_path
        self.limits = limits
        self.temp_root = temp_root
        self.s3_secret = s3_secret
        self.extension_dir = extension_dir
        temp_root.mkdir(parents=True, exist_ok=True)
        if s3_secret is not None:
            if extension_dir is None:
                raise ValueError("S3 queries need an extension directory for httpfs")
            install_extensions(extension_dir, ["httpfs"])
        # Queries run in at most `concurrency` worker processes; the limiter bounds the
        # service's threads that wait on them (running or waiting for a worker) so
        # queries cannot starve the threads ingestion and storage use.
        self.config = EngineConfig(
            threads=limits.threads,
            memory_limit=limits.memory_limit,
            max_temp_bytes=limits.max_temp_bytes,
            extension_dir=str(extension_dir) if extension_dir is not None else None,
            s3=s3_secret is not None,
            address_space=limits.worker_address_space,
            max_result_bytes=limits.max_result_bytes,
            temp_root=str(temp_root),
            pooled=2 * limits.concurrency,
        )
        self.workers = WorkerPool(self.config, limits.concurrency)
        # Checked statements by their text: the analysis depends on nothing else (the
        # tables a caller may read, their versions and policies are resolved per query).
        self._analyses: OrderedDict[str, Analysis] = OrderedDict()
        self._analyses_lock = threading.Lock()  # (an engine may serve several loops)
        self._threads = anyio.CapacityLimiter(limits.concurrency * 2)
        self._internal: duckdb.DuckDBPyConnection | None = None
        self._internal_secret: dict[str, str] | None = None
        self._internal_lock = threading.Lock()

    def warm(self, count: int) -> None:
        """Starts ``count`` query workers in the background (and keeps that many)."""
        self.workers.warm(count)

    def close(self) -> None:
        """Stop the idle workers (a query still running stops its own when it ends)."""
        self.workers.close()
        with self._internal_lock:
            if self._internal is not None:
                self._internal.close()
                self._internal = None

    def clamp(self, limit: int | None, timeout_s: float | None) -> tuple[int, float]:
        rows = self.limits.default_rows if limit is None else limit
        if rows < 1 or rows > self.limits.max_rows:
            raise InvalidInput(
                f"limit must be between 1 and {self.limits.max_rows}", code="invalid_limit"
            )
        timeout = self.limits.default_timeout_s if timeout_s is None else timeout_s
        if not 0 < timeout <= self.limits.max_timeout_s:
            raise InvalidInput(
                f"timeout_s must be > 0 and <= {self.limits.max_timeout_s}",
                code="invalid_timeout",
            )
        return rows, timeout

    async def run(
        self,
        source: SuperState | Resolver,
        sql: str,
        *,
        limit: int | None = None,
        timeout_s: float | None = None,
        offset: int = 0,
        scope: str | None = None,
    ) -> QueryResult:
        """Run ``sql`` over the tables of a super's state, or over the table versions a
        resolver picks for the query's table references: at most ``limit`` rows after
        the first ``offset``."""
        result = await self._execute(
            source, sql, limit, timeout_s, offset, plan_only=False, scope=scope
        )
        assert isinstance(result, QueryResult)
        return result

    async def plan(
        self,
        source: SuperState | Resolver,
        sql: str,
        *,
        timeout_s: float | None = None,
        scope: str | None = None,
    ) -> QueryPlan:
        """Check, bind and plan ``sql`` exactly as ``run`` would, without running it."""
        result = await self._execute(source, sql, None, timeout_s, 0, plan_only=True, scope=scope)
        assert isinstance(result, QueryPlan)
        return result

    async def _execute(
        self,
        source: SuperState | Resolver,
        sql: str,
        limit: int | None,
        timeout_s: float | None,
        offset: int,
        *,
        plan_only: bool,
        scope: str | None,
    ) -> QueryResult | QueryPlan:
        rows, timeout = self.clamp(limit, timeout_s)
        if offset < 0 or offset > self.limits.max_offset:
            raise InvalidInput(
                f"offset must be between 0 and {self.limits.max_offset}", code="invalid_offset"
            )
        resolve = current_views(source) if isinstance(source, SuperState) else source
        analysis = await self._analysis(sql)
        views = await resolve(analysis)
        # `timeout` waiting for a worker and running, then the grace period after which
        # the worker is killed; the margin past that is only a safety net.
        with anyio.move_on_after(timeout + self.limits.grace_s + _SAFETY_S):
            if scope is None and isinstance(source, SuperState):
                scope = f"{source.org}/{source.name}"
            job = _Job(views, analysis, rows, timeout, offset, plan_only, scope)
            return await anyio.to_thread.run_sync(
                self._run_slot,
                job,
                limiter=self._threads,
                abandon_on_cancel=True,
            )
        raise QueryTimeout(
            f"the query ran longer than its timeout of {timeout:g}s and did not stop; "
            "it was abandoned"
        )

    async def _analysis(self, sql: str) -> Analysis:
        """The checked statement: kept for a text seen before (a dashboard's or a team
        tool's), else parsed in a thread, off the event loop (a huge statement must not
        stall it). Only accepted statements are kept, and only short ones."""
        with self._analyses_lock:
            kept = self._analyses.get(sql)
            if kept is not None:
                self._analyses.move_to_end(sql)
                return kept
        analysis = await anyio.to_thread.run_sync(
            lambda: analyze_sql(sql, max_chars=self.limits.max_sql_chars),
            limiter=self._threads,
        )
        if len(sql) <= ANALYSES_MAX_CHARS:
            with self._analyses_lock:
                self._analyses[sql] = analysis
                if len(self._analyses) > ANALYSES_KEPT:
                    self._analyses.popitem(last=False)
        return analysis

    def connect_internal(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection for the write side (upserts, deletes, compaction): it
        reads data files like queries do (same limits, S3 secret), with no sandbox,
        since only our own statements run on it.

        It is a cursor on one internal database the engine keeps: opening a database
        costs about 16 ms, a cursor under 1 ms, and the database keeps the footers of
        the files it read. A cursor's temp tables and registered tables are its own.
        A new database replaces it when the S3 credentials change."""
        secret = self.s3_secret() if self.s3_secret is not None else None
        with self._internal_lock:
            if self._internal is None or self._internal_secret != secret:
                # The old database lives on while cursors on it run, then goes.
                self._internal = base_connection(
                    self.config, self.temp_root / f"internal-{uuid.uuid4().hex}", secret
                )
                self._internal_secret = secret
            return self._internal.cursor()

    def _run_slot(self, job: _Job) -> QueryResult | QueryPlan:
        # One deadline for both: the time spent waiting for a worker is not run again.
        started = time.monotonic()
        secret = self.s3_secret() if self.s3_secret is not None else None
        key = _job_key(job, secret)
        for attempt in range(2):
            try:
                return self._run_on_worker(job, key, secret, started)
            except WorkerGone:
                if attempt:  # a second idle worker gone: something kills them
                    raise Unavailable(
                        "query workers keep ending before they run a query",
                        code="query_unavailable",
                    ) from None
        raise AssertionError("unreachable")

    def _run_on_worker(
        self, job: _Job, key: str, secret: dict[str, str] | None, started: float
    ) -> QueryResult | QueryPlan:
        worker = self.workers.acquire(key, max(job.timeout - (time.monotonic() - started), 0))
        run_for = max(job.timeout - (time.monotonic() - started), 0.05)
        healthy = False
        try:
            wire = self._wire(job, key, secret, run_for)
            kill_at = time.monotonic() + run_for + self.limits.grace_s
            schema, batches, end = worker.run(wire, kill_at)
            healthy = True
        except Overtime:
            raise QueryTimeout(
                f"the query ran longer than its timeout of {job.timeout:g}s and did not "
                "stop; its worker process was killed"
            ) from None
        except WorkerGone:
            raise
        except WorkerDied as exc:
            raise lost_error(exc, self.config.address_space) from None
        except LedgerError:
            healthy = True  # the query's own error: the worker is fine
            raise
        finally:
            self.workers.release(worker, healthy)
        assert schema is not None
        if job.plan_only:
            return QueryPlan(schema, frozenset(job.analysis.tables), end.plan or "")
        table = pa.Table.from_batches(batches, schema=schema)
        return QueryResult(table=table, truncated=end.truncated, elapsed_ms=end.elapsed_ms)

    def _wire(self, job: _Job, key: str, secret: dict[str, str] | None, run_for: float) -> bytes:
        views: dict[str, View] = {}
        paths: dict[str, str] = {}
        for name, source in job.views.items():
            if isinstance(source, Restricted):
                t = source.table
                views[name] = View(t.columns, t.files, source.select, source.where)
            else:
                views[name] = View(source.columns, source.files)
            for f in views[name].files:
                if not f.is_inline:
                    paths[f.path] = self.resolve_path(f.path)
        return _encode(
            Job(
                key=key,
                views=views,
                paths=paths,
                sql=job.analysis.sql,
                limit=job.limit,
                offset=job.offset,
                timeout=job.timeout,
                run_for=run_for,
                plan_only=job.plan_only,
                secret=secret,
            )
        )


# The statements whose analysis is kept (least recently used go first), and the longest
# text kept: at most about 4 MB of SQL.
ANALYSES_KEPT = 1024
ANALYSES_MAX_CHARS = 4096

# How long past the kill the service waits for a worker's thread before answering 408
# anyway (the kill answers first; this only guards against a wedged thread).
_SAFETY_S = 5.0


def _job_key(job: _Job, secret: dict[str, str] | None) -> str:
    """The pool key of a job's connection ("" for none): its super, its views (with
    their versions and policies) and the storage credentials it opens with."""
    if job.scope is None:
        return ""
    text = repr((job.scope, views_key(job.views), sorted((secret or {}).items())))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
