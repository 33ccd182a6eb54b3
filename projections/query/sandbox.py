"""DuckDB connections as queries and the write side get them: the base connection (limits,
extensions off, the S3 secret) and the sandbox a user's query runs in (only its views'
files readable, external access off, the configuration locked).

Used in query worker processes (``worker``) and, for the write side's own statements,
in the service process (``engine.QueryEngine.connect_internal``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import duckdb

from events.errors import (
    InvalidInput,
    LedgerError,
    QueryRejected,
    QueryTimeout,
    QueryTooLarge,
    Unavailable,
    first_line,
)
from projections.arrow import quote_ident, sql_literal
from projections.query.views import version_sql
from projections.query.wire import EngineConfig, View

_DISABLED_OPTIONS = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "python_enable_replacements": False,
}


def base_connection(
    config: EngineConfig, temp_dir: Path, secret: Mapping[str, str] | None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB database with the engine's limits, extensions off and the storage's S3
    secret: no sandbox yet."""
    options: dict[str, str | bool | int | float | list[str]] = {
        **_DISABLED_OPTIONS,
        "threads": config.threads,
        "memory_limit": config.memory_limit,
        # Each query spills into a directory of its own: DuckDB names its spill
        # files alike, and two queries sharing one directory crash the process.
        "temp_directory": str(temp_dir),
        "max_temp_directory_size": config.max_temp_bytes,
    }
    if config.extension_dir is not None:
        options["extension_directory"] = config.extension_dir
    con = duckdb.connect(":memory:", config=options)
    try:
        # Data files never change once published: a pooled connection keeps their
        # footers. (An extension's setting: it cannot be part of ``config``.)
        con.execute("SET parquet_metadata_cache = true")
        # ...and no check that a cached file is unchanged before each use: that check is
        # a file-system call per file per query, and with external access off it cost
        # about 2-4.5 ms per 100-file query (docs/BENCHMARKS.md). A data file's name is
        # new for every write and its bytes never change; a deleted one is in no version
        # a query can reach.
        con.execute("SET validate_external_file_cache = 'NO_VALIDATION'")
        if config.s3:
            # Loaded from the project-local directory (installed offline at start);
            # the credentials live in a scoped secret, never in the SQL text.
            con.execute("LOAD httpfs")
            if secret is not None:
                options_sql = ", ".join(f"{k} {sql_literal(v)}" for k, v in secret.items())
                con.execute(f"CREATE SECRET ledgerlake_storage (TYPE s3, {options_sql})")
    except duckdb.Error:
        con.close()
        raise
    return con


def sandboxed_connection(
    config: EngineConfig,
    views: Mapping[str, View],
    resolve_path: Callable[[str], str],
    temp_dir: Path,
    secret: Mapping[str, str] | None,
) -> duckdb.DuckDBPyConnection:
    """A connection in which exactly ``views`` exist, reading only their files, with
    external access off and the configuration locked."""
    try:
        con = base_connection(config, temp_dir, secret)
    except duckdb.Error as exc:
        raise Unavailable(
            f"the object store cannot be set up: {first_line(exc)}", code="data_unavailable"
        ) from exc
    try:
        # Only the tables the query names become views (and readable files).
        paths = [resolve_path(f.path) for v in views.values() for f in v.files if not f.is_inline]
        # A literal list: as a parameter, DuckDB's Python converter tried to import
        # pandas twice per path (a third of a 100-file point lookup's time).
        listing = ", ".join(sql_literal(p) for p in paths)
        con.execute(f"SET allowed_paths = [{listing}]")
        con.execute("SET enable_external_access = false")
        for name, view in views.items():
            body = version_sql(con, view.columns, view.files, resolve_path)
            if view.select is not None:
                # The policy is part of the view itself: no SQL can reach around it.
                body = f"SELECT {view.select} FROM ({body}) AS __ll_source WHERE {view.where}"
            con.execute(f"CREATE VIEW {quote_ident(name)} AS {body}")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        # Only our own statements ran: a failure is a missing or unreadable file.
        raise Unavailable(
            f"a data file of this super cannot be read: {first_line(exc)}",
            code="data_unavailable",
        ) from exc
    return con


def engine_error(exc: duckdb.Error, timeout: float) -> LedgerError:
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
        return QueryTooLarge(f"the query needs more memory than allowed: {first_line(exc)}")
    return InvalidInput(f"SQL error: {first_line(exc)}", code="sql_error")
