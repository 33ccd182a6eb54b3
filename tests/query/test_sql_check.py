"""Statement checks on parsed trees (the engine enforces the rest; see test_query_safety.py)."""

from __future__ import annotations

import pytest

from events.errors import InvalidInput, QueryRejected
from projections.query.analysis import check_sql

ALLOWED = [
    "select 1",
    "SELECT a, count(*) FROM t GROUP BY a ORDER BY 2 DESC",
    "with x as (select 1 as a) select * from x",
    "select 1 union all select 2",
    "from t",
    "select * from (select 1) sub",
    "-- a comment\nselect 1;",
]
REJECTED = [
    ("select 1; select 2", "sql_multiple_statements"),
    ("insert into t values (1)", "sql_not_select"),
    ("create table x as select 1", "sql_not_select"),
    ("copy t to '/tmp/x.csv'", "sql_not_select"),
    ("attach '/tmp/x.db'", "sql_not_select"),
    ("install httpfs", "sql_not_select"),
    ("load httpfs", "sql_not_select"),
    ("set threads = 1", "sql_not_select"),
    ("pragma version", "sql_not_select"),
    ("call pragma_version()", "sql_not_select"),
    ("describe t", "sql_not_select"),
    ("show tables", "sql_not_select"),
    ("explain select 1", "sql_not_select"),
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_single_queries_pass(sql: str) -> None:
    check_sql(sql)


@pytest.mark.parametrize(("sql", "code"), REJECTED)
def test_everything_else_is_rejected(sql: str, code: str) -> None:
    with pytest.raises(QueryRejected) as err:
        check_sql(sql)
    assert err.value.code == code


@pytest.mark.parametrize("sql", ["", "   ", "selec 1", "select from where"])
def test_empty_or_broken_sql_is_invalid_input(sql: str) -> None:
    with pytest.raises(InvalidInput):
        check_sql(sql)
