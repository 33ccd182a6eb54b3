"""The auth projection: principals, tokens and grants, folded from the auth stream.

Every API pod folds the stream's tail before it checks a credential (one XRANGE round
trip, usually empty), so a revoked token, a disabled principal or a removed grant stops
working on every pod with the next request.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from events.model import (
    Event,
    GrantAdded,
    GrantRemoved,
    PrincipalChanged,
    PrincipalCreated,
    RoleDefined,
    TokenIssued,
    TokenRevoked,
)

# Built-in roles and what they allow. ``grant``: manage principals, tokens, grants and
# policies inside the scope.
ROLES: dict[str, frozenset[str]] = {
    "reader": frozenset({"read"}),
    "writer": frozenset({"read", "write"}),
    "org_admin": frozenset({"read", "write", "grant"}),
}


class Principal(msgspec.Struct, frozen=True):
    id: str
    name: str
    kind: str
    org: str
    created_at: datetime
    created_by: str
    attributes: dict[str, str] = {}
    admin: bool = False
    disabled: bool = False
    external_id: str | None = None


class Token(msgspec.Struct, frozen=True):
    id: str
    principal_id: str
    token_hash: str
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked: bool = False


class Grant(msgspec.Struct, frozen=True):
    id: str
    principal_id: str
    role: str
    org: str
    super_: str = ""
    table: str = ""

    def covers(self, org: str, super_: str = "", table: str = "") -> bool:
        """Whether the grant's scope contains the object."""
        if self.org != org:
            return False
        if self.super_ and self.super_ != super_:
            return False
        return not (self.table and self.table != table)

    def within(self, org: str, super_: str = "") -> bool:
        """Whether the grant's scope lies inside org (or org/super): it makes them
        visible, without any permission on the rest of them."""
        return self.org == org and (not super_ or self.super_ == super_)


class AuthState(msgspec.Struct, frozen=True):
    principals: dict[str, Principal] = {}
    tokens: dict[str, Token] = {}
    grants: dict[str, Grant] = {}
    # Custom roles: org -> role name -> permissions.
    roles: dict[str, dict[str, frozenset[str]]] = {}
    position: str = "0-0"

    def permissions(self, org: str, role: str) -> frozenset[str]:
        """What ``role`` allows in ``org`` (a built-in role, or one of the org's)."""
        return ROLES.get(role) or self.roles.get(org, {}).get(role, frozenset())


def apply_auth(state: AuthState, event: Event) -> AuthState:
    principals, tokens, grants, roles = state.principals, state.tokens, state.grants, state.roles
    if isinstance(event, PrincipalCreated):
        principal = Principal(
            id=event.principal_id,
            name=event.name,
            kind=event.kind,
            org=event.org,
            created_at=event.time,
            created_by=event.actor,
            attributes=event.attributes,
            admin=event.admin,
            external_id=event.external_id,
        )
        principals = {**principals, event.principal_id: principal}
    elif isinstance(event, PrincipalChanged) and event.principal_id in principals:
        old = principals[event.principal_id]
        changes = {
            "name": event.name,
            "attributes": event.attributes,
            "disabled": event.disabled,
        }
        new = msgspec.structs.replace(old, **{k: v for k, v in changes.items() if v is not None})
        principals = {**principals, event.principal_id: new}
    elif isinstance(event, TokenIssued):
        token = Token(
            id=event.token_id,
            principal_id=event.principal_id,
            token_hash=event.token_hash,
            name=event.name,
            created_at=event.time,
            expires_at=event.expires_at,
        )
        tokens = {**tokens, event.token_id: token}
    elif isinstance(event, TokenRevoked) and event.token_id in tokens:
        revoked = msgspec.structs.replace(tokens[event.token_id], revoked=True)
        tokens = {**tokens, event.token_id: revoked}
    elif isinstance(event, GrantAdded):
        grant = Grant(
            id=event.grant_id,
            principal_id=event.principal_id,
            role=event.role,
            org=event.org,
            super_=event.super_,
            table=event.table,
        )
        grants = {**grants, event.grant_id: grant}
    elif isinstance(event, GrantRemoved):
        grants = {k: v for k, v in grants.items() if k != event.grant_id}
    elif isinstance(event, RoleDefined):
        org_roles = {**roles.get(event.org, {}), event.name: frozenset(event.permissions)}
        if not event.permissions:
            del org_roles[event.name]
        roles = {**roles, event.org: org_roles}
    return AuthState(principals, tokens, grants, roles, position=event.id or state.position)
