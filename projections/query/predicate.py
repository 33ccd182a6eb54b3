"""Restricted SQL boolean expressions over one table's columns (``DELETE ... WHERE``).

The text is parsed with sqlglot and every node of the tree must be of an allowed kind:
column references (unqualified, existing), literals, comparisons, boolean logic,
``IN`` lists, ``BETWEEN``, ``LIKE``, ``IS [NOT] NULL``, arithmetic, casts and a short
list of pure scalar functions. No subqueries, no table functions, no other statements.
What runs is the SQL regenerated from that checked tree, never the raw text.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import sqlglot
import sqlglot.errors
from sqlglot import exp

from events.errors import InvalidInput, first_line
from events.model import Field
from projections.arrow import arrow_schema

MAX_CHARS = 10_000

_ALLOWED_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Paren,
    exp.And, exp.Or, exp.Not, exp.Xor,
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ,
    exp.Is, exp.In, exp.Between, exp.Like, exp.ILike,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Neg, exp.IntDiv,
    exp.Cast, exp.TryCast, exp.DataType, exp.DataTypeParam, exp.Tuple,
    exp.Lower, exp.Upper, exp.Length, exp.Abs, exp.Coalesce, exp.Trim, exp.Substring,
    exp.StartsWith, exp.Round, exp.Floor, exp.Ceil, exp.Year, exp.Month, exp.Day,
    exp.Date, exp.Timestamp, exp.TsOrDsToDate, exp.DPipe, exp.Concat,
)  # fmt: skip


def check_predicate(text: str, columns: tuple[Field, ...]) -> str:
    """Validate ``text`` as a boolean expression over ``columns``; return the SQL to run.

    InvalidInput (code ``invalid_where``) says what is not allowed."""
    if not text or not text.strip():
        raise _invalid("the where expression is empty")
    if len(text) > MAX_CHARS:
        raise _invalid(f"the where expression is longer than {MAX_CHARS} characters")
    try:
        tree = sqlglot.parse_one(text, dialect="duckdb", into=exp.Condition)
    except (sqlglot.errors.SqlglotError, RecursionError) as exc:
        raise _invalid(f"cannot parse the where expression: {first_line(exc)}") from exc
    names = {f.name.lower(): f.name for f in columns}
    for node in tree.walk():
        if not isinstance(node, _ALLOWED_NODES):
            raise _invalid(f"{node.key.upper()} is not allowed in a where expression")
        if isinstance(node, exp.Column):
            if node.table or node.args.get("db") or node.args.get("catalog"):
                raise _invalid(f"use bare column names, not {node.sql('duckdb')!r}")
            if node.name.lower() not in names:
                raise _invalid(f"the table has no column {node.name!r}")
    sql = tree.sql(dialect="duckdb")
    _check_types(sql, columns)
    return sql


def _check_types(sql: str, columns: tuple[Field, ...]) -> None:
    """Evaluate the expression on one row of NULLs of the schema: unknown functions,
    type errors, bad constants (``id = 'abc'``) and non-boolean results are caught
    before any file is read."""
    schema = arrow_schema(columns)
    row = pa.table({f.name: pa.nulls(1, f.type) for f in schema}, schema=schema)
    con = duckdb.connect(":memory:", config={"enable_external_access": False})
    try:
        con.register("t", row)
        (kind,) = con.execute(f"SELECT typeof(({sql})) FROM t").fetchall()[0]
    except duckdb.Error as exc:
        raise _invalid(f"the where expression does not fit the table: {first_line(exc)}") from exc
    finally:
        con.close()
    if kind not in ("BOOLEAN", '"NULL"', "NULL"):
        raise _invalid(f"the where expression must be true or false, not {kind}")


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_where")
