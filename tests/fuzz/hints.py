"""Hints for the fuzzer: values that name what exists (the seeded org, super, tables,
versions, principals, tokens, grants and role) or that a route understands (SQL, a
delete condition, a key column), swapped into most generated cases, so that fuzzing
gets past the 404s and 400s to the routes' own logic. The rest of the cases keep what
was generated.

Each hook works on one part of a case (path, query, headers, body); when the part has
hinted fields, it takes real values for all of them (3 times in 4) or none."""

from __future__ import annotations

import zlib
from typing import Any

import schemathesis

from tests.fuzz.world import DOOMED, ORG, SUPER, TABLE, World

SQL = [
    "select * from orders",
    "select region, sum(amount) as total from orders group by region order by region",
    "select o.id from orders o left join orders v1 AT (VERSION => 1) using (id)",
    "select count(*) from orders o join doomed d using (id)",
    "select * from nosuch",
]
WHERE = ["amount < 0", "region = 'eu'", "id in (1, 2)", "nosuch = 1", "id ="]


def _hinted(original: Any, values: dict[str, list[Any]]) -> Any:
    """``original`` with its hinted keys replaced by real values, for 3 in 4 generated
    values. Decided by a hash of the value, not by a Hypothesis choice: Hypothesis
    steers away from a branch whose few values it has already tried."""
    if not isinstance(original, dict) or not any(k in values for k in original):
        return original
    digest = zlib.crc32(repr(sorted(original.items(), key=str)).encode())
    if digest % 4 == 0:
        return original
    return {
        k: values[k][(digest >> 2) % len(values[k])] if k in values else v
        for k, v in original.items()
    }


COLUMNS = ["id", "region", "amount", "note"]


def _rows(rows: list[Any]) -> list[Any]:
    """Generated rows with the seeded table's column names for their keys (3 times in
    4), so that appends and upserts meet the stored schema: evolve it, or conflict."""
    if zlib.crc32(repr(rows).encode()) % 4 == 0:
        return rows
    return [
        {COLUMNS[i % len(COLUMNS)]: v for i, v in enumerate(row.values())}
        if isinstance(row, dict)
        else row
        for row in rows
    ]


def register(schema: Any, world: World) -> None:
    """Register the hint hooks on ``schema`` (its cases only)."""
    principals = world.names["principal_id"]
    common = {"org": [ORG], "super": [SUPER], "table": [TABLE]}
    query = {
        **common,
        "key": ["id", "id,region", "nosuch"],
        "newer_than": ["amount"],
        "warehouse": [ORG],
        "parent": [ORG, SUPER, f"{ORG}.{SUPER}"],
        "principal": principals,
        "limit": [1, 2, 50],
    }
    headers = {"If-Match": ["1", "3", '"4"', 'W/"5"', "-1", "999"]}
    body = {
        **common,
        "sql": SQL,
        "where": WHERE,
        "keys": [{"id": [1]}, {"id": [2, 99]}, {"region": ["eu"]}, {"nosuch": [1]}],
        "version": [1, 2, 3, 99],
        "as_of_version": [1, 2],
        "timeout_s": [5],
        "formats": [["delta"], ["iceberg"], ["delta", "iceberg"], []],
        "principal_id": principals,
        "role": ["reader", "writer", "loader"],
        "permissions": [["read"], ["write"], ["read", "write"], []],
        "kind": ["user", "service"],
    }

    @schema.hook
    def map_path_parameters(
        context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
    ) -> Any:
        op = context.operation
        assert op is not None
        names = dict(world.names)
        if op.method.upper() == "DELETE" and op.path.endswith("/tables/{table}"):
            names["table"] = [DOOMED]
        names["namespace"] = [SUPER] if "{prefix}" in op.path else [f"{ORG}.{SUPER}"]
        return _hinted(path_parameters, names)

    @schema.hook
    def map_query(context: schemathesis.HookContext, query_: Any) -> Any:
        hinted = _hinted(query_, query)
        if hinted is not query_ and hinted.get("mode", "append") != "upsert":
            # key and newer_than go with mode=upsert only (else 400 invalid_mode)
            hinted = {k: v for k, v in hinted.items() if k not in ("key", "newer_than")}
        return hinted

    @schema.hook
    def map_headers(context: schemathesis.HookContext, headers_: Any) -> Any:
        return _hinted(headers_, headers)

    @schema.hook
    def map_body(context: schemathesis.HookContext, body_: Any) -> Any:
        if isinstance(body_, list):
            return _rows(body_)
        hinted = _hinted(body_, body)
        if hinted is not body_ and {"keys", "where"} <= set(hinted):
            # a delete takes one of them (else 400 invalid_delete)
            hinted.pop("keys" if len(repr(body_)) % 2 else "where")
        return hinted
