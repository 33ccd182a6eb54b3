"""Principals, API tokens and grants: each change is an event of the auth stream.

Who may manage what: a platform admin, anything; an ``org_admin`` of an org, the
principals of that org, their tokens and grants inside the org; anyone, their own
tokens (issue and revoke). Everything else is 404 if the caller cannot see it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from litestar import Request, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from app.access.auth import Caller, Forbidden, new_id, new_token
from app.api.guards import caller_of, request_id
from app.api.routes.params import error_responses
from app.api.schemas import (
    GrantIn,
    GrantOut,
    PrincipalIn,
    PrincipalOut,
    PrincipalPatch,
    RoleIn,
    TokenIn,
    TokenInfo,
    TokenOut,
    WhoAmI,
)
from app.services import Services
from app.write.request import check_name
from events.errors import AlreadyExists, InvalidInput, NotFound
from events.model import (
    GrantAdded,
    GrantRemoved,
    PrincipalChanged,
    PrincipalCreated,
    RoleDefined,
    TokenIssued,
    TokenRevoked,
    now,
)
from projections.auth import ROLES, Grant, Principal

KINDS = ("user", "service")
MAX_EXPIRY_S = 100 * 365 * 86400

# What these routes answer besides the guard's statuses (documented by the app).
_NOTES = {
    403: "visible, but the caller may not manage it",
    404: "unknown principal, token, grant or org (or not the caller's to manage)",
    409: "another principal has that external id",
}


def _errors(*codes: int) -> Any:
    return error_responses(*codes, notes=_NOTES)


def _principal_out(p: Principal) -> PrincipalOut:
    return PrincipalOut(
        p.id, p.name, p.kind, p.org or None, p.attributes, p.admin, p.disabled,
        p.created_at, p.created_by, p.external_id,
    )  # fmt: skip


def _grant_out(g: Grant) -> GrantOut:
    return GrantOut(g.id, g.principal_id, g.role, g.org, g.super_ or None, g.table or None)


def _manages(caller: Caller, principal: Principal) -> bool:
    """Whether the caller may manage this principal (its org's admin, or a platform
    admin)."""
    if caller.admin:
        return True
    return bool(principal.org) and caller.can("grant", principal.org)


async def _principal(services: Services, caller: Caller, principal_id: str) -> Principal:
    state = await services.auth.state()
    principal = state.principals.get(principal_id)
    if principal is None or not (
        _manages(caller, principal) or principal.id == caller.principal.id
    ):
        raise NotFound(f"principal {principal_id!r} does not exist", code="principal_not_found")
    return principal


def _base(request: Request[Any, Any, Any], org: str, **scope: str) -> dict[str, Any]:
    return {
        "org": org,
        "super_": "",
        "actor": caller_of(request).actor,
        "time": now(),
        "request_id": request_id(request),
        **scope,
    }


@post("/v1/principals", status_code=201, responses=_errors(403, 404, 409))
async def create_principal(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    data: JSONBody[PrincipalIn],
) -> PrincipalOut:
    """Create a user or service principal of an org (``org``), or, for a platform
    admin only, another platform admin (``admin: true``, no org)."""
    caller = caller_of(request)
    if data.kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}", code="invalid_kind")
    if not data.name.strip() or len(data.name) > 200:
        raise InvalidInput("name must be 1 to 200 characters", code="invalid_name")
    if data.admin:
        if data.org:
            raise InvalidInput("a platform admin belongs to no org", code="invalid_principal")
        if not caller.admin:
            raise Forbidden("only a platform admin creates platform admins")
    else:
        if not data.org:
            raise InvalidInput(
                "a principal needs an org (or admin: true)", code="invalid_principal"
            )
        check_name("org", data.org)
        caller.require("grant", data.org)
    if data.external_id is not None:
        state = await services.auth.state()
        if any(p.external_id == data.external_id for p in state.principals.values()):
            raise AlreadyExists(
                f"another principal has the external id {data.external_id!r}",
                code="external_id_taken",
            )
    principal_id = new_id("p")
    await services.auth.append(
        PrincipalCreated(
            principal_id=principal_id,
            name=data.name,
            kind=data.kind,
            attributes=data.attributes,
            admin=data.admin,
            external_id=data.external_id,
            **_base(request, data.org or ""),
        )
    )
    state = await services.auth.state()
    return _principal_out(state.principals[principal_id])


@get("/v1/principals")
async def list_principals(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> list[PrincipalOut]:
    """The principals the caller manages (and itself)."""
    caller = caller_of(request)
    state = await services.auth.state()
    shown = [
        p for p in state.principals.values() if _manages(caller, p) or p.id == caller.principal.id
    ]
    return [_principal_out(p) for p in sorted(shown, key=lambda p: (p.org, p.name, p.id))]


@patch("/v1/principals/{principal_id:str}", responses=_errors(403, 404))
async def change_principal(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    principal_id: FromPath[str],
    data: JSONBody[PrincipalPatch],
) -> PrincipalOut:
    """Rename, set attributes (used by row filters) or disable/enable a principal. A
    disabled principal's tokens stop working at once."""
    caller = caller_of(request)
    principal = await _principal(services, caller, principal_id)
    if not _manages(caller, principal):
        raise Forbidden("only an org admin changes a principal")
    if principal.id == caller.principal.id and data.disabled:
        raise InvalidInput("a principal cannot disable itself", code="invalid_principal")
    await services.auth.append(
        PrincipalChanged(
            principal_id=principal.id,
            name=data.name,
            attributes=data.attributes,
            disabled=data.disabled,
            **_base(request, principal.org),
        )
    )
    state = await services.auth.state()
    return _principal_out(state.principals[principal.id])


@post("/v1/principals/{principal_id:str}/tokens", status_code=201, responses=_errors(403, 404))
async def issue_token(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    principal_id: FromPath[str],
    data: JSONBody[TokenIn],
) -> TokenOut:
    """A new API token for the principal. The token is in this response only; the
    service keeps its hash."""
    caller = caller_of(request)
    principal = await _principal(services, caller, principal_id)
    if data.expires_in_s is not None and not 0 < data.expires_in_s <= MAX_EXPIRY_S:
        # Past the cap, the expiry instant overflows datetime (a 500 before).
        raise InvalidInput(
            f"expires_in_s must be positive and at most {MAX_EXPIRY_S} (100 years)",
            code="invalid_expiry",
        )
    expires = now() + timedelta(seconds=data.expires_in_s) if data.expires_in_s else None
    if not _manages(caller, principal):
        # A principal's own token: never outliving the credential that asks for it (so
        # a short-lived token cannot mint a permanent one); not from a JWT login.
        state = await services.auth.state()
        own = state.tokens.get(caller.token_id)
        if own is None:
            raise Forbidden("only an API token issues its principal's own tokens")
        if own.expires_at is not None and (expires is None or expires > own.expires_at):
            raise Forbidden(
                "a token may not outlive the token that issues it "
                f"(expires_in_s at most until {own.expires_at.isoformat()})"
            )
    token_id = new_id("t")
    token, token_hash = new_token(token_id)
    await services.auth.append(
        TokenIssued(
            token_id=token_id,
            principal_id=principal.id,
            token_hash=token_hash,
            name=data.name,
            expires_at=expires,
            **_base(request, principal.org),
        )
    )
    return TokenOut(token_id, principal.id, data.name, expires, token)


@get("/v1/principals/{principal_id:str}/tokens", responses=_errors(404))
async def list_tokens(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    principal_id: FromPath[str],
) -> list[TokenInfo]:
    """The principal's tokens (never their secrets), revoked ones included: for its org
    admin, or the principal itself."""
    principal = await _principal(services, caller_of(request), principal_id)
    state = await services.auth.state()
    tokens = [t for t in state.tokens.values() if t.principal_id == principal.id]
    return [
        TokenInfo(t.id, t.principal_id, t.name, t.expires_at, t.revoked, t.created_at)
        for t in sorted(tokens, key=lambda t: (t.created_at, t.id))
    ]


@delete("/v1/tokens/{token_id:str}", status_code=200, responses=_errors(404))
async def revoke_token(
    request: Request[Any, Any, Any], services: NamedDependency[Services], token_id: FromPath[str]
) -> TokenOut:
    """Revoke a token: it stops working on every API pod with the next request."""
    caller = caller_of(request)
    state = await services.auth.state()
    token = state.tokens.get(token_id)
    owner = state.principals.get(token.principal_id) if token is not None else None
    if (
        token is None
        or owner is None
        or not (_manages(caller, owner) or owner.id == caller.principal.id)
    ):  # one answer for a missing token and someone else's
        raise NotFound(f"token {token_id!r} does not exist", code="token_not_found")
    principal = owner
    if not token.revoked:
        await services.auth.append(TokenRevoked(token_id=token_id, **_base(request, principal.org)))
    return TokenOut(token.id, token.principal_id, token.name, token.expires_at)


@post("/v1/grants", status_code=201, responses=_errors(403, 404))
async def add_grant(
    request: Request[Any, Any, Any], services: NamedDependency[Services], data: JSONBody[GrantIn]
) -> GrantOut:
    """Give a principal a role on an org, a super or a table of its own org."""
    caller = caller_of(request)
    known = [*ROLES, *sorted((await services.auth.state()).roles.get(data.org, {}))]
    if data.role not in known:
        raise InvalidInput(
            f"role must be one of {', '.join(known)}", code="invalid_role", role=data.role
        )
    if data.table and not data.super:
        raise InvalidInput("a table scope needs its super", code="invalid_scope")
    for kind, name in (("org", data.org), ("super", data.super), ("table", data.table)):
        if name is not None:
            check_name(kind, name)
    caller.require("grant", data.org, data.super or "", data.table or "")
    principal = await _principal(services, caller, data.principal_id)
    if principal.admin or principal.org != data.org:
        raise InvalidInput("a grant is for a principal of the same org", code="invalid_scope")
    grant_id = new_id("g")
    await services.auth.append(
        GrantAdded(
            grant_id=grant_id,
            principal_id=principal.id,
            role=data.role,
            **_base(request, data.org, super_=data.super or "", table=data.table or ""),
        )
    )
    state = await services.auth.state()
    return _grant_out(state.grants[grant_id])


@get("/v1/grants")
async def list_grants(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> list[GrantOut]:
    """The grants the caller manages, and its own."""
    caller = caller_of(request)
    state = await services.auth.state()
    shown = [
        g
        for g in state.grants.values()
        if g.principal_id == caller.principal.id or caller.can("grant", g.org, g.super_, g.table)
    ]
    return [_grant_out(g) for g in sorted(shown, key=lambda g: (g.org, g.super_, g.table, g.id))]


@delete("/v1/grants/{grant_id:str}", status_code=200, responses=_errors(403, 404))
async def remove_grant(
    request: Request[Any, Any, Any], services: NamedDependency[Services], grant_id: FromPath[str]
) -> GrantOut:
    caller = caller_of(request)
    state = await services.auth.state()
    grant = state.grants.get(grant_id)
    if grant is None or not caller.sees(grant.org, grant.super_, grant.table):
        raise NotFound(f"grant {grant_id!r} does not exist", code="grant_not_found")
    caller.require("grant", grant.org, grant.super_, grant.table)
    await services.auth.append(
        GrantRemoved(
            grant_id=grant_id,
            **_base(request, grant.org, super_=grant.super_, table=grant.table),
        )
    )
    return _grant_out(grant)


PERMISSIONS = ("read", "write", "grant")


@put("/v1/roles/{name:str}", responses=_errors(403, 404))
async def define_role(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    name: FromPath[str],
    data: JSONBody[RoleIn],
) -> dict[str, Any]:
    """Define (or change) a custom role of an org: a name for a set of permissions
    (``read``, ``write``, ``grant``); ``[]`` retires it. For org admins."""
    caller = caller_of(request)
    check_name("org", data.org)
    caller.require("grant", data.org)
    check_name("role", name)
    if name in ROLES:
        raise InvalidInput(f"{name!r} is a built-in role", code="invalid_role")
    unknown = sorted(set(data.permissions) - set(PERMISSIONS))
    if unknown:
        raise InvalidInput(
            f"unknown permission(s) {', '.join(unknown)} (known: {', '.join(PERMISSIONS)})",
            code="invalid_role",
        )
    permissions = tuple(p for p in PERMISSIONS if p in data.permissions)
    await services.auth.append(
        RoleDefined(name=name, permissions=permissions, **_base(request, data.org))
    )
    return {"org": data.org, "name": name, "permissions": list(permissions)}


@get("/v1/roles", responses=_errors(404))
async def list_roles(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    org: Annotated[str, QueryParameter()],
) -> list[dict[str, Any]]:
    """The built-in roles and the org's custom roles, with their permissions."""
    caller_of(request).require_visible(org)
    state = await services.auth.state()
    roles = {**{r: p for r, p in ROLES.items()}, **state.roles.get(org, {})}
    return [
        {"name": r, "permissions": [p for p in PERMISSIONS if p in roles[r]], "builtin": r in ROLES}
        for r in roles
    ]


@get("/v1/whoami")
async def whoami(request: Request[Any, Any, Any]) -> WhoAmI:
    """Who this credential is: the principal (with its attributes, which row filters
    may use), the token id (none for a JWT or the static token) and its grants."""
    caller = caller_of(request)
    return WhoAmI(
        _principal_out(caller.principal),
        caller.token_id or None,
        [_grant_out(g) for g in caller.grants],
    )


ADMIN_HANDLERS = [
    whoami,
    define_role,
    list_roles,
    create_principal,
    list_principals,
    change_principal,
    list_tokens,
    issue_token,
    revoke_token,
    add_grant,
    list_grants,
    remove_grant,
]
