"""Authentication and authorization.

Credentials (``Authorization: Bearer <token>``):
- a Ledgerlake API token, ``llt_<token id>_<secret>``: only the SHA-256 of the secret is
  stored (in its ``TokenIssued`` event); it is compared in constant time, and it stops
  working at its expiry, when it is revoked or when its principal is disabled;
- ``LEDGERLAKE_API_TOKEN``, a static platform-admin token (deployments that predate
  principals), compared in constant time.

Authorization: a principal belongs to one org (its tenant), or is a platform admin. A
grant gives a role (``reader``, ``writer``, ``org_admin``) on an org, a super or a table.
Anything the principal has no grant on or under is *not found* (404), never forbidden:
another tenant's objects cannot even be probed. An object it can see but not act on is
403.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import jwt
import redis.asyncio as aioredis

from app.access.ratelimit import RateLimiter
from events.errors import LedgerError, NotFound, Unauthorized
from events.model import EventBase, PrincipalCreated, TokenIssued, decode_event, encode_event, now
from events.redis_log import Keys, guarded
from projections.auth import ROLES, AuthState, Grant, Principal, apply_auth

TOKEN_PREFIX = "llt_"
# llt_<token id>_<secret>; the secret (URL-safe base64) may itself contain "_".
TOKEN_FORMAT = re.compile(r"^llt_(?P<id>t_[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]+)$")
PAGE = 5000


class TooManyRequests(LedgerError):
    """The principal is over its rate limit (429, with Retry-After)."""

    code = "rate_limited"


class Forbidden(LedgerError):
    """The principal can see the object but lacks the permission."""

    code = "forbidden"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(token_id: str) -> tuple[str, str]:
    """(the token as shown once, the hash to store)."""
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{token_id}_{secret}", hash_secret(secret)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the principal and the credential used."""

    principal: Principal
    token_id: str
    grants: tuple[Grant, ...]
    roles: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)

    @property
    def actor(self) -> str:
        """What events record: ``<principal id>`` plus ``/<token id>``."""
        return f"{self.principal.id}/{self.token_id}" if self.token_id else self.principal.id

    @property
    def admin(self) -> bool:
        return self.principal.admin

    def can(self, perm: str, org: str, super_: str = "", table: str = "") -> bool:
        if self.admin:
            return True
        return any(
            perm in self.permissions(g) and g.covers(org, super_, table) for g in self.grants
        )

    def permissions(self, grant: Grant) -> frozenset[str]:
        """What a grant's role allows (built-in, or a custom role of its org)."""
        return ROLES.get(grant.role) or self.roles.get(grant.org, {}).get(grant.role, frozenset())

    def sees(self, org: str, super_: str = "", table: str = "") -> bool:
        """Whether the object exists for this principal (any grant on it, above it or,
        for an org or super, below it)."""
        if self.admin:
            return True
        if self.principal.org != org:
            return False
        for g in self.grants:
            if g.covers(org, super_, table):
                return True
            if not table and g.within(org, super_):
                return True
        return False

    def require_visible(self, org: str, super_: str = "", table: str = "") -> None:
        """404 for what the principal cannot see."""
        if not self.sees(org):
            raise NotFound(f"org {org!r} does not exist", code="org_not_found")
        if super_ and not self.sees(org, super_):
            raise NotFound(f"super {org}/{super_} does not exist", code="super_not_found")
        if table and not self.sees(org, super_, table):
            raise NotFound(f"table {org}/{super_}/{table} does not exist", code="table_not_found")

    def require(self, perm: str, org: str, super_: str = "", table: str = "") -> None:
        """404 for what the principal cannot see, 403 for what it cannot do."""
        self.require_visible(org, super_, table)
        if not self.can(perm, org, super_, table):
            where = "/".join(p for p in (org, super_, table) if p)
            raise Forbidden(f"{self.principal.id} may not {perm} {where}", permission=perm)


# Claims naming the principal, in this order.
IDENTITY_CLAIMS = ("sub", "client_id", "email", "username")


@dataclass(frozen=True)
class JwtConfig:
    """How to verify JWTs from an identity provider; None of the key sources: off."""

    hs256_secret: str | None = None
    public_key: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    required_scopes: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.public_key or self.jwks_url)


class JwtVerifier:
    """Validates a JWT (signature, ``exp`` always, ``iss``/``aud`` when configured,
    required scopes) and returns the identity it names."""

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self._jwks = (
            jwt.PyJWKClient(config.jwks_url, cache_keys=True, lifespan=300, timeout=10)
            if config.jwks_url
            else None
        )

    def identity(self, token: str) -> tuple[str, dict[str, Any]]:
        """(the identity, the claims); Unauthorized for anything invalid."""
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256" and self.config.hs256_secret:
                key: Any = self.config.hs256_secret
            elif alg == "RS256" and self._jwks is not None and header.get("kid"):
                key = self._jwks.get_signing_key_from_jwt(token).key
            elif alg == "RS256" and self.config.public_key:
                key = self.config.public_key
            else:
                raise Unauthorized(f"JWT algorithm {alg!r} is not accepted", code="invalid_jwt")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self.config.issuer,
                audience=self.config.audience,
                options={
                    "require": ["exp"],
                    "verify_aud": self.config.audience is not None,
                    "verify_iss": self.config.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the JWT has expired", code="token_expired") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise Unauthorized(f"invalid JWT: {exc}", code="invalid_jwt") from None
        scopes = claims.get("scope", claims.get("scp", ""))
        granted = set(scopes.split() if isinstance(scopes, str) else scopes or [])
        missing = [s for s in self.config.required_scopes if s not in granted]
        if missing:
            raise Unauthorized(
                f"the JWT lacks the scope(s) {', '.join(missing)}", code="insufficient_scope"
            )
        for claim in IDENTITY_CLAIMS:
            value = claims.get(claim)
            if isinstance(value, str) and value:
                return value, claims
        raise Unauthorized(
            "the JWT names no principal (sub, client_id, email, username)", code="invalid_jwt"
        )


# The principal of LEDGERLAKE_API_TOKEN, the static token.
STATIC_ADMIN = Principal(
    id="api-token",
    name="LEDGERLAKE_API_TOKEN",
    kind="service",
    org="",
    created_at=datetime.fromtimestamp(0, UTC),
    created_by="settings",
    admin=True,
)


class AuthStore:
    """The auth stream and its fold, brought up to date on every read."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, jwt_config: JwtConfig | None = None
    ) -> None:
        self.client = client
        self.keys = keys
        self.jwt = JwtVerifier(jwt_config) if jwt_config and jwt_config.enabled else None
        self.stream = keys.auth_stream
        self._state = AuthState()
        self._rate = RateLimiter(client, keys)

    async def limit(self, caller: Caller, per_second: int) -> None:
        """At most ``per_second`` requests per principal per second, counted in Redis
        (so across every API pod, ``app/access/ratelimit.py``); TooManyRequests past it."""
        if per_second <= 0:
            return
        if not await self._rate.admit(caller.principal.id, per_second):
            raise TooManyRequests(
                f"more than {per_second} requests per second; retry shortly",
                limit_per_s=per_second,
            )

    async def state(self) -> AuthState:
        state = self._state
        while True:
            entries: Any = await guarded(
                self.client.xrange(self.stream, min=f"({state.position}", max="+", count=PAGE)
            )
            for eid, fields in entries:
                state = apply_auth(state, decode_event(eid, fields))
            if len(entries) < PAGE:
                break
        self._state = state
        return state

    async def append(self, event: EventBase) -> str:
        fields: Any = encode_event(event)
        raw: Any = await guarded(self.client.xadd(self.stream, fields))
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def authenticate(self, header: str, static_token: str | None) -> Caller:
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized("missing bearer token", code="unauthorized")
        if static_token and hmac.compare_digest(
            credential.encode("utf-8", "surrogateescape"), static_token.encode()
        ):
            return Caller(STATIC_ADMIN, "", ())
        match = TOKEN_FORMAT.match(credential)
        if match:
            token_id, secret = match["id"], match["secret"]
            state = await self.state()
            token = state.tokens.get(token_id)
            if token is not None and hmac.compare_digest(
                hash_secret(secret).encode(), token.token_hash.encode()
            ):
                return _caller(state, token.principal_id, token.id)
        if self.jwt is not None and credential.count(".") == 2:
            # PyJWKClient fetches over HTTP (blocking): off the event loop.
            identity, _claims = await anyio.to_thread.run_sync(self.jwt.identity, credential)
            state = await self.state()
            for principal in state.principals.values():
                if principal.external_id == identity:
                    if principal.disabled:
                        raise Unauthorized("this principal is disabled", code="principal_disabled")
                    grants = tuple(
                        g for g in state.grants.values() if g.principal_id == principal.id
                    )
                    return Caller(principal, "jwt", grants, state.roles)
            raise Unauthorized(
                "no principal has this identity (create one with external_id)",
                code="unknown_principal",
            )
        raise Unauthorized("invalid bearer token", code="unauthorized")

    async def caller_again(
        self, principal_id: str, token_id: str, static_token: str | None
    ) -> Caller:
        """The caller a console session stands for (``app/console/sessions.py``), checked
        again as of now: the token it signed in with neither revoked nor expired, its
        principal not disabled, its grants as they are now. Unauthorized otherwise."""
        if principal_id == STATIC_ADMIN.id and not token_id:
            if not static_token:
                raise Unauthorized("LEDGERLAKE_API_TOKEN is no longer set", code="unauthorized")
            return Caller(STATIC_ADMIN, "", ())
        state = await self.state()
        if token_id != "jwt":
            token = state.tokens.get(token_id)
            if token is None or token.principal_id != principal_id:
                raise Unauthorized("this token was revoked", code="token_revoked")
        return _caller(state, principal_id, token_id)


def _caller(state: AuthState, principal_id: str, token_id: str) -> Caller:
    """The caller of a token (``token_id``, or "jwt") of ``principal_id`` as ``state``
    has them now; Unauthorized if the token is revoked or expired or the principal is
    disabled."""
    token = state.tokens.get(token_id)
    if token is not None:
        if token.revoked:
            raise Unauthorized("this token was revoked", code="token_revoked")
        if token.expires_at is not None and token.expires_at <= now():
            raise Unauthorized("this token has expired", code="token_expired")
    principal = state.principals.get(principal_id)
    if principal is None or principal.disabled:
        raise Unauthorized("this principal is disabled", code="principal_disabled")
    grants = tuple(g for g in state.grants.values() if g.principal_id == principal.id)
    return Caller(principal, token_id, grants, state.roles)


async def bootstrap_admin(store: AuthStore, data_dir: Path) -> str | None:
    """On a deployment with no principal yet: create a platform admin and its token,
    write the token to ``<data-dir>/admin-token`` (mode 0600) and return it (to be
    printed once). None if there are principals already."""
    state = await store.state()
    if state.principals:
        return None
    principal_id, token_id = new_id("p"), new_id("t")
    token, token_hash = new_token(token_id)
    base: dict[str, Any] = {"org": "", "super_": "", "actor": "bootstrap", "time": now()}
    await store.append(
        PrincipalCreated(principal_id=principal_id, name="admin", kind="user", admin=True, **base)
    )
    await store.append(
        TokenIssued(
            token_id=token_id,
            principal_id=principal_id,
            token_hash=token_hash,
            name="bootstrap",
            **base,
        )
    )
    _write_secret(data_dir / "admin-token", token)
    return token


def _write_secret(path: Path, secret: str) -> None:
    """Write a secret readable by its owner only (0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
