"""Row-level security and column masking: a table's policies, compiled per caller into
the view its queries read (``projections.query.engine.Restricted``).

A caller with no role but policy-bound ones on a table reads it through them. Several
such roles: the rows any of their filters allows, and each column as the most open of
them shows it (plain, then hashed, then nulled, then hidden: a column one role hides and
another masks is masked). Platform admins, org admins of the table and any role without
a policy on the table read it all. What such a caller sees of the table's metadata
follows from the same policies, in ``visibility.py``. ``:principal.<attr>`` in a filter is
the caller's attribute as a SQL literal (NULL if it has none: no rows match).
"""

from __future__ import annotations

import re

from app.access.auth import Caller
from events.errors import InvalidInput
from events.model import Field, Policy
from projections.arrow import duckdb_type, quote_ident, sql_literal
from projections.auth import ROLES
from projections.catalog import TableState
from projections.query.predicate import check_predicate
from projections.query.types import Restricted, ViewSource

MASKS = ("null", "hash")
_PLACEHOLDER = re.compile(r":principal\.([A-Za-z_][A-Za-z0-9_]*)")


def _literal(value: str | None) -> str:
    return "NULL" if value is None else sql_literal(value)


def bind(text: str, attributes: dict[str, str]) -> str:
    """``text`` with every ``:principal.<attr>`` replaced by a literal."""
    return _PLACEHOLDER.sub(lambda m: _literal(attributes.get(m.group(1))), text)


def check_policies(
    policies: tuple[Policy, ...], columns: tuple[Field, ...], custom: tuple[str, ...] = ()
) -> None:
    """InvalidInput unless every policy names a known role and existing columns, its
    masks are known and its filter is a valid restricted expression."""
    names = {f.name for f in columns}
    seen: set[str] = set()
    for policy in policies:
        if policy.role not in ROLES and policy.role not in custom:
            known = ", ".join([*ROLES, *custom])
            raise InvalidInput(
                f"unknown role {policy.role!r} (known: {known})", code="invalid_policy"
            )
        if policy.role in seen:
            raise InvalidInput(f"two policies for role {policy.role!r}", code="invalid_policy")
        seen.add(policy.role)
        for column in (*policy.hidden, *policy.masks):
            if column not in names:
                raise InvalidInput(f"the table has no column {column!r}", code="invalid_policy")
        bad = sorted(set(policy.masks.values()) - set(MASKS))
        if bad:
            raise InvalidInput(
                f"unknown mask(s) {', '.join(bad)} (known: {', '.join(MASKS)})",
                code="invalid_policy",
            )
        if len(set(policy.hidden)) >= len(columns):
            raise InvalidInput("a policy must leave a column visible", code="invalid_policy")
        if policy.row_filter is not None:
            # Checked with a sample value for every placeholder.
            check_predicate(_PLACEHOLDER.sub("'x'", policy.row_filter), columns)


def binds(caller: Caller, org: str, super_: str, table: TableState) -> bool:
    """Whether the table's policies apply to the caller (row filters or masks)."""
    return restrict(caller, org, super_, table, table) is not table


def applied_policies(caller: Caller, org: str, super_: str, current: TableState) -> list[Policy]:
    """The table's policies that bind the caller (none: it reads everything)."""
    if caller.admin or caller.can("grant", org, super_, current.name) or not current.policies:
        return []
    # Only the roles that read count: a write-only or retired role lifts no policy.
    roles = {
        g.role
        for g in caller.grants
        if g.covers(org, super_, current.name) and "read" in caller.permissions(g)
    }
    by_role = {p.role: p for p in current.policies}
    if not roles or any(role not in by_role for role in roles):
        return []
    return [by_role[role] for role in sorted(roles)]


HIDDEN = "hidden"
# From the most open treatment of a column to the most closed (None: plain).
_OPENNESS: tuple[str | None, ...] = (None, "hash", "null", HIDDEN)


def treatment(applied: list[Policy], column: str) -> str | None:
    """How the ``applied`` policies together show ``column``: None (plain), ``hash``,
    ``null`` or ``hidden``, the most open of what each of them does to it."""
    each = {HIDDEN if column in p.hidden else p.masks.get(column) for p in applied}
    return min(each, key=_OPENNESS.index)


def restrict(
    caller: Caller, org: str, super_: str, current: TableState, version: TableState
) -> ViewSource:
    """``version`` of the table as the caller may see it, under the table's *current*
    policies (a policy also covers the table's past versions)."""
    applied = applied_policies(caller, org, super_, current)
    if not applied:
        return version
    filters: list[str] = []
    for policy in applied:
        if policy.row_filter is None:
            filters = []
            break
        bound = bind(policy.row_filter, caller.principal.attributes)
        filters.append(f"({check_predicate(bound, version.columns)})")
    select = []
    for field in version.columns:
        shown = treatment(applied, field.name)
        name = quote_ident(field.name)
        if shown == HIDDEN:
            continue
        if shown == "null":
            select.append(f"CAST(NULL AS {duckdb_type(field.type)}) AS {name}")
        elif shown == "hash":
            select.append(f"sha256(CAST({name} AS VARCHAR)) AS {name}")
        else:
            select.append(name)
    if not select:
        select = ["NULL AS __ll_no_visible_column"]
    where = " OR ".join(filters) if filters else "TRUE"
    return Restricted(version, ", ".join(select), where)
