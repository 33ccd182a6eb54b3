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

import importlib
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import duckdb
import pyarrow as pa
import sqlglot
import sqlglot.errors
from sqlglot import exp

from events.errors import InvalidInput, QueryRejected, QueryTimeout, Unavailable
from projections.arrow import quote_ident
from projections.catalog import SuperState, TableState
from projections.query.views import version_sql


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
    # for before the client gets its 408 anyway (the engine thread is then abandoned).
    grace_s: float = 2.0


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


_DISABLED_OPTIONS = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "python_enable_replacements": False,
}


# Table and scalar functions that read or change engine state. With the configuration
# locked they are mostly harmless, but they reveal server paths or toggle logging and
# profiling, which no catalog query needs.
_DENIED_FUNCTIONS = frozenset({
    "current_setting", "duckdb_settings", "duckdb_secrets", "which_secret",
    "duckdb_extensions", "duckdb_temporary_files", "duckdb_memory", "duckdb_databases",
    "duckdb_log_contexts", "duckdb_logs", "getvariable", "set_variable",
    # SQL in a string is not visible to these checks: no nested statements.
    "query", "query_table",
})  # fmt: skip
_DENIED_PREFIXES = ("enable_", "disable_")


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


def check_sql(sql: str, *, max_chars: int = 100_000) -> set[str]:
    """The lower-cased names of the tables a checked query references."""
    return analyze_sql(sql, max_chars=max_chars).tables


def analyze_sql(sql: str, *, max_chars: int = 100_000) -> Analysis:
    """Reject anything but a single read-only query, judged on parsed trees, and find
    the tables (and table versions) it reads."""
    if not sql.strip():
        raise InvalidInput("the SQL text is empty", code="sql_empty")
    if len(sql) > max_chars:
        raise InvalidInput(
            f"the SQL text is longer than {max_chars} characters", code="sql_too_long"
        )
    try:
        return _check_sql(sql)
    except RecursionError as exc:
        raise InvalidInput("the SQL is nested too deeply", code="sql_too_complex") from exc


def _check_sql(sql: str) -> Analysis:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidInput(f"SQL syntax error: {_first_line(exc)}", code="sql_syntax") from exc
    if len(statements) != 1:
        raise QueryRejected(
            f"exactly one SQL statement is allowed, got {len(statements)}",
            code="sql_multiple_statements",
        )
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryRejected(
            f"only SELECT queries are allowed, got {statements[0].type.name}",
            code="sql_not_select",
        )
    try:
        trees = sqlglot.parse(sql, dialect="duckdb")
    except sqlglot.errors.SqlglotError as exc:
        raise QueryRejected(
            f"the query could not be verified as a plain SELECT: {_first_line(exc)}",
            code="sql_not_select",
        ) from exc
    # A trailing comment or extra ';' is an empty statement to sqlglot, not to DuckDB.
    real = [t for t in trees if t is not None and not isinstance(t, exp.Semicolon)]
    tree = real[0] if len(real) == 1 else None
    if not isinstance(tree, exp.Query):
        got = tree.key.upper() if tree is not None else f"{len(real)} statements"
        raise QueryRejected(f"only SELECT queries are allowed, got {got}", code="sql_not_select")
    for node in tree.find_all(exp.Anonymous):
        name = node.name.lower()
        if name in _DENIED_FUNCTIONS or name.startswith(_DENIED_PREFIXES):
            raise QueryRejected(
                f"the function {name}() is not available in catalog queries",
                code="query_forbidden",
            )
    refs: set[TableRef] = set()
    rewritten = False
    for table in list(tree.find_all(exp.Table)):
        if not table.name:
            continue
        when = table.args.get("when")
        if when is None:
            refs.add(TableRef(table.name.lower()))
            continue
        ref = _time_travel_ref(table.name.lower(), when)
        refs.add(ref)
        alias = table.alias or table.name
        table.set("when", None)
        table.set("this", exp.to_identifier(ref.view, quoted=True))
        table.set("alias", exp.TableAlias(this=exp.to_identifier(alias, quoted=True)))
        rewritten = True
    return Analysis(frozenset(refs), tree.sql(dialect="duckdb") if rewritten else sql)


def _time_travel_ref(name: str, when: exp.Expression) -> TableRef:
    """``AT (VERSION => 3)`` or ``AT (TIMESTAMP => '2026-01-01 12:00:00+00')``."""
    kind = str(when.args.get("kind") or "").upper()
    value = when.expression
    if isinstance(value, exp.Cast):
        value = value.this
    if str(when.this).upper() == "AT" and isinstance(value, exp.Literal):
        if kind == "VERSION" and not value.is_string:
            try:
                return TableRef(name, version=int(value.this))
            except ValueError:
                pass
        if kind == "TIMESTAMP" and value.is_string:
            return TableRef(name, time=parse_time(value.this))
    raise InvalidInput(
        f"time travel on {name!r} must be AT (VERSION => <integer>) or "
        "AT (TIMESTAMP => '<ISO timestamp>')",
        code="invalid_time_travel",
    )


def parse_time(text: str) -> datetime:
    """An ISO 8601 instant; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"not an ISO 8601 timestamp: {text!r}", code="invalid_time_travel"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# Every extension the project ships offline: httpfs reads S3 (installed when storage is
# S3); delta and iceberg (which needs avro) are for the mirrors.
EXTENSIONS = ("httpfs", "avro", "delta", "iceberg")


def install_extensions(directory: Path, names: Iterable[str]) -> None:
    """Install DuckDB extensions into ``directory`` from the ``duckdb-extension-<name>``
    wheels built for the pinned DuckDB: nothing is downloaded at run time. Already
    installed extensions are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"extension_directory": str(directory)})
    try:
        installed = {
            row[0]
            for row in con.execute(
                "select extension_name from duckdb_extensions() where installed"
            ).fetchall()
        }
        for name in names:
            if name in installed:
                continue
            module = importlib.import_module(f"duckdb_extension_{name}")
            version = duckdb.__version__
            shipped = Path(module.__file__ or "").parent / "extensions" / f"v{version}"
            binary = shipped / f"{name}.duckdb_extension"
            if not binary.exists():
                raise RuntimeError(
                    f"duckdb-extension-{name} has no build for DuckDB {version} at {binary}"
                )
            con.execute(f"INSTALL {_sql_literal(str(binary))}")
    finally:
        con.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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


def _views_key(views: dict[str, ViewSource]) -> tuple[object, ...]:
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
class _Pooled:
    con: duckdb.DuckDBPyConnection
    temp_dir: Path
    opened: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class _ConnectionPool:
    """Idle query connections, by the views they hold (``_views_key``), least recently
    used first out. Setting a connection up (the database, the sandbox, the views and
    their files' footers) cost more than most queries; a connection is only ever used
    by one query at a time, and only for the same views, so reusing it changes nothing
    a query can see. A table's new version is a new key: the old ones age out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: OrderedDict[tuple[object, ...], list[_Pooled]] = OrderedDict()
        self.count = 0
        self.closed = False
        self.lock = threading.Lock()

    def take(self, key: tuple[object, ...]) -> _Pooled | None:
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

    def give(self, key: tuple[object, ...], pooled: _Pooled) -> bool:
        """Keep ``pooled`` for the next query of ``key`` (evicting the least recently
        used); False if the pool keeps nothing."""
        if self.size <= 0:
            return False
        evicted: list[_Pooled] = []
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

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle = [p for free in self.idle.values() for p in free]
            self.idle.clear()
            self.count = 0
        for pooled in idle:
            pooled.close()


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
        self._pool = _ConnectionPool(2 * limits.concurrency)
        self._threads = anyio.CapacityLimiter(limits.concurrency * 2)

    def close(self) -> None:
        """Close the idle connections (queries still running close their own)."""
        self._pool.close()

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

    def connect_internal(self, temp_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection for the write side (upserts, deletes, compaction): it
        reads data files like queries do (same limits, S3 secret), with no sandbox,
        since only our own statements run on it."""
        return self._base_connection(temp_dir or self.temp_root / uuid.uuid4().hex)

    def _base_connection(self, temp_dir: Path) -> duckdb.DuckDBPyConnection:
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
                secret = self.s3_secret()
                if secret is not None:
                    options = ", ".join(f"{k} {_sql_literal(v)}" for k, v in secret.items())
                    con.execute(f"CREATE SECRET ledgerlake_storage (TYPE s3, {options})")
        except duckdb.Error:
            con.close()
            raise
        return con

    def _connect(self, views: dict[str, ViewSource], temp_dir: Path) -> duckdb.DuckDBPyConnection:
        try:
            con = self._base_connection(temp_dir)
        except duckdb.Error as exc:
            raise Unavailable(
                f"the object store cannot be set up: {_first_line(exc)}",
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
            listing = ", ".join(_sql_literal(p) for p in paths)
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
                f"a data file of this super cannot be read: {_first_line(exc)}",
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
        key = (job.scope, _views_key(views))
        pooled = self._pool.take(key) if job.scope is not None else None
        if pooled is None:
            temp_dir = self.temp_root / uuid.uuid4().hex
            pooled = _Pooled(self._connect(views, temp_dir), temp_dir)
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
            table = pa.Table.from_batches(batches, schema=reader.schema)
            # A truncated result leaves the query unfinished on the connection (its
            # state, maybe spill files): such a connection is not kept.
            reusable = not truncated
        except duckdb.InterruptException as exc:
            raise QueryTimeout(
                f"the query ran longer than its timeout of {timeout:g}s and was stopped"
            ) from exc
        except duckdb.PermissionException as exc:
            raise QueryRejected(
                f"the query tried something the engine does not allow: {_first_line(exc)}",
                code="query_forbidden",
            ) from exc
        except (duckdb.IOException, duckdb.HTTPException) as exc:
            # External access is off: the only files a query reaches are ours.
            raise Unavailable(
                f"a data file could not be read: {_first_line(exc)}", code="data_unavailable"
            ) from exc
        except duckdb.OutOfMemoryException as exc:
            raise QueryRejected(
                f"the query needs more memory than allowed: {_first_line(exc)}",
                code="query_out_of_memory",
            ) from exc
        except duckdb.Error as exc:
            raise InvalidInput(f"SQL error: {_first_line(exc)}", code="sql_error") from exc
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
