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
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import duckdb
import pyarrow as pa

from events.errors import (
    InvalidInput,
    LedgerError,
    QueryRejected,
    QueryTimeout,
    Unavailable,
    first_line,
)
from projections.arrow import quote_ident, sql_literal
from projections.catalog import SuperState
from projections.query.analysis import analyze_sql
from projections.query.current import current_views
from projections.query.extensions import install_extensions
from projections.query.pool import ConnectionPool, Pooled, views_key
from projections.query.types import (
    Analysis,
    QueryLimits,
    QueryPlan,
    QueryResult,
    Resolver,
    Restricted,
    ViewSource,
)
from projections.query.views import version_sql

_DISABLED_OPTIONS = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "python_enable_replacements": False,
}


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
        # At most `concurrency` engines run at once. The semaphore is taken and released
        # by the query's own thread, so a query abandoned after its timeout keeps its
        # slot until it really ends. The limiter bounds the threads (running or waiting
        # for a slot) so queries cannot starve the pool ingestion and storage use.
        self._running = threading.BoundedSemaphore(limits.concurrency)
        self._pool = ConnectionPool(2 * limits.concurrency)
        self._threads = anyio.CapacityLimiter(limits.concurrency * 2)
        self._internal: duckdb.DuckDBPyConnection | None = None
        self._internal_secret: dict[str, str] | None = None
        self._internal_lock = threading.Lock()

    def close(self) -> None:
        """Close the idle connections (queries still running close their own)."""
        self._pool.close()
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
        # Parsing runs in a thread, off the event loop: a huge statement must not stall it.
        analysis = await anyio.to_thread.run_sync(
            lambda: analyze_sql(sql, max_chars=self.limits.max_sql_chars),
            limiter=self._threads,
        )
        views = await resolve(analysis)
        # `timeout` waiting for a slot and running, then the grace period.
        with anyio.move_on_after(timeout + self.limits.grace_s):
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
                self._internal = self._base_connection(
                    self.temp_root / f"internal-{uuid.uuid4().hex}", secret
                )
                self._internal_secret = secret
            return self._internal.cursor()

    def _base_connection(
        self, temp_dir: Path, secret: dict[str, str] | None
    ) -> duckdb.DuckDBPyConnection:
        config: dict[str, str | bool | int | float | list[str]] = {
            **_DISABLED_OPTIONS,
            "threads": self.limits.threads,
            "memory_limit": self.limits.memory_limit,
            # Each query spills into a directory of its own: DuckDB names its spill
            # files alike, and two queries sharing one directory crash the process.
            "temp_directory": str(temp_dir),
            "max_temp_directory_size": self.limits.max_temp_bytes,
        }
        if self.extension_dir is not None:
            config["extension_directory"] = str(self.extension_dir)
        con = duckdb.connect(":memory:", config=config)
        try:
            # Data files never change once published: a pooled connection keeps their
            # footers. (An extension's setting: it cannot be part of ``config``.)
            con.execute("SET parquet_metadata_cache = true")
            if self.s3_secret is not None:
                # Loaded from the project-local directory (installed offline at start);
                # the credentials live in a scoped secret, never in the SQL text.
                con.execute("LOAD httpfs")
                if secret is not None:
                    options = ", ".join(f"{k} {sql_literal(v)}" for k, v in secret.items())
                    con.execute(f"CREATE SECRET ledgerlake_storage (TYPE s3, {options})")
        except duckdb.Error:
            con.close()
            raise
        return con

    def _connect(self, views: dict[str, ViewSource], temp_dir: Path) -> duckdb.DuckDBPyConnection:
        try:
            secret = self.s3_secret() if self.s3_secret is not None else None
            con = self._base_connection(temp_dir, secret)
        except duckdb.Error as exc:
            raise Unavailable(
                f"the object store cannot be set up: {first_line(exc)}",
                code="data_unavailable",
            ) from exc
        try:
            # Only the tables the query names become views (and readable files).
            tables = {v: s.table if isinstance(s, Restricted) else s for v, s in views.items()}
            paths = [
                self.resolve_path(f.path)
                for t in tables.values()
                for f in t.files
                if not f.is_inline
            ]
            # A literal list: as a parameter, DuckDB's Python converter tried to import
            # pandas twice per path (a third of a 100-file point lookup's time).
            listing = ", ".join(sql_literal(p) for p in paths)
            con.execute(f"SET allowed_paths = [{listing}]")
            con.execute("SET enable_external_access = false")
            for view, table in tables.items():
                body = version_sql(con, table.columns, table.files, self.resolve_path)
                source = views[view]
                if isinstance(source, Restricted):
                    # The policy is part of the view itself: no SQL can reach around it.
                    body = (
                        f"SELECT {source.select} FROM ({body}) AS __ll_source WHERE {source.where}"
                    )
                con.execute(f"CREATE VIEW {quote_ident(view)} AS {body}")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as exc:
            con.close()
            # Only our own statements ran: a failure is a missing or unreadable file.
            raise Unavailable(
                f"a data file of this super cannot be read: {first_line(exc)}",
                code="data_unavailable",
            ) from exc
        return con

    def _run_slot(self, job: _Job) -> QueryResult | QueryPlan:
        # One deadline for both: the time spent waiting for a slot is not run again.
        started = time.monotonic()
        if not self._running.acquire(timeout=job.timeout):
            raise Unavailable(
                f"all {self.limits.concurrency} query slots stayed busy for {job.timeout:g}s; "
                "try again later",
                code="query_busy",
            )
        try:
            left = max(job.timeout - (time.monotonic() - started), 0.05)
            return self._run_sync(job, left)
        finally:
            self._running.release()

    def _run_sync(self, job: _Job, run_for: float) -> QueryResult | QueryPlan:
        """The query, interrupted after ``run_for`` seconds (what is left of its
        timeout once it got a slot)."""
        views, analysis, limit, timeout, offset = (
            job.views, job.analysis, job.limit, job.timeout, job.offset
        )  # fmt: skip
        started = time.perf_counter()
        key = (job.scope, views_key(views))
        pooled = self._pool.take(key) if job.scope is not None else None
        if pooled is None:
            temp_dir = self.temp_root / uuid.uuid4().hex
            pooled = Pooled(self._connect(views, temp_dir), temp_dir)
        con = pooled.con
        # Whether the timer interrupted this query, decided under a lock: a connection
        # the timer may still reach must not serve another query.
        guard = threading.Lock()
        state = {"done": False, "fired": False}

        def interrupt() -> None:
            with guard:
                if state["done"]:
                    return
                state["fired"] = True
                con.interrupt()

        timer = threading.Timer(run_for, interrupt)
        timer.start()
        sql = analysis.sql
        reusable = False
        try:
            if job.plan_only:
                # A relation is bound (names, types, functions checked) but not run.
                relation = con.sql(sql)
                schema = relation.limit(0).to_arrow_table().schema
                plan = QueryPlan(schema, frozenset(analysis.tables), relation.explain())
                reusable = True
                return plan
            table, truncated = self._read_result(con, sql, limit, offset)
            # A truncated result leaves the query unfinished on the connection (its
            # state, maybe spill files): such a connection is not kept.
            reusable = not truncated
        except duckdb.Error as exc:
            raise _engine_error(exc, timeout) from exc
        finally:
            timer.cancel()
            with guard:
                state["done"] = True
            # A connection goes back to the pool only after a query that ended well and
            # was never interrupted (an interrupt could reach its next query).
            keep = reusable and not state["fired"] and job.scope is not None
            if not (keep and self._pool.give(key, pooled)):
                pooled.close()
        return QueryResult(
            table=table, truncated=truncated, elapsed_ms=(time.perf_counter() - started) * 1000
        )

    def _read_result(
        self, con: duckdb.DuckDBPyConnection, sql: str, limit: int, offset: int
    ) -> tuple[pa.Table, bool]:
        """The rows of ``sql`` past ``offset``, up to ``limit`` rows and the byte limit,
        and whether it was cut there."""
        reader = con.execute(sql).to_arrow_reader(min(limit + 1, 65536))
        batches: list[pa.RecordBatch] = []
        count, size, truncated = 0, 0, False
        for batch in reader:
            if offset:  # skipped rows of the same plan: pages keep the engine's order
                skip = min(offset, batch.num_rows)
                offset -= skip
                batch = batch.slice(skip)
                if not batch.num_rows:
                    continue
            if count + batch.num_rows > limit:
                batch = batch.slice(0, limit - count)
                truncated = True
            batches.append(batch)
            count += batch.num_rows
            size += batch.nbytes
            if truncated or size > self.limits.max_result_bytes:
                truncated = truncated or size > self.limits.max_result_bytes
                break
        return pa.Table.from_batches(batches, schema=reader.schema), truncated


def _engine_error(exc: duckdb.Error, timeout: float) -> LedgerError:
    """What a query's engine error is to the caller."""
    if isinstance(exc, duckdb.InterruptException):
        return QueryTimeout(
            f"the query ran longer than its timeout of {timeout:g}s and was stopped"
        )
    if isinstance(exc, duckdb.PermissionException):
        return QueryRejected(
            f"the query tried something the engine does not allow: {first_line(exc)}",
            code="query_forbidden",
        )
    if isinstance(exc, duckdb.IOException | duckdb.HTTPException):
        # External access is off: the only files a query reaches are ours.
        return Unavailable(
            f"a data file could not be read: {first_line(exc)}", code="data_unavailable"
        )
    if isinstance(exc, duckdb.OutOfMemoryException):
        return QueryRejected(
            f"the query needs more memory than allowed: {first_line(exc)}",
            code="query_out_of_memory",
        )
    return InvalidInput(f"SQL error: {first_line(exc)}", code="sql_error")
