"""What a statement may do: exactly one read-only query expression by DuckDB's parser
and sqlglot's, no engine-state functions, and the tables it names (with ``AT (VERSION
=> n)`` or ``AT (TIMESTAMP => t)`` time travel, rewritten to views of that version).
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import sqlglot
import sqlglot.errors
from sqlglot import exp

from events.errors import InvalidInput, QueryRejected, first_line
from projections.query.types import (
    Analysis,
    TableRef,
)

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
        raise InvalidInput(f"SQL syntax error: {first_line(exc)}", code="sql_syntax") from exc
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
            f"the query could not be verified as a plain SELECT: {first_line(exc)}",
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
