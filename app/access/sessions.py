"""The web console's sessions, kept in Redis so that every API process (and pod) knows
them.

Signing in with a token (an API token, the static token or a JWT) makes a session: a
random id the browser holds in an HttpOnly cookie, and a random CSRF token the page
sends back in ``X-CSRF-Token`` on every state-changing request. Redis keeps, under the
*hash* of the id, only who signed in and with which token (its id, never the secret);
every request builds the caller again from the auth state as of that moment
(``AuthStore.caller_again``), so a revoked token, an expired one or a disabled
principal ends the session at once, on every process. A session ends after
``idle_s`` without a request and ``absolute_s`` after sign-in (or when its JWT
expires), whichever comes first, and at sign-out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from events.redis_log import Keys, guarded

COOKIE = "ledgerlake_session"
CSRF_HEADER = "X-CSRF-Token"


class Session(msgspec.Struct, frozen=True):
    principal: str
    token: str  # the token's id ("" for the static token, "jwt" for a JWT)
    csrf: str
    created: float
    ends: float  # the absolute end: sign-in + absolute_s, or the JWT's expiry


def _key(keys: Keys, session_id: str) -> str:
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    return f"{keys.prefix}:console:session:{digest}"


class SessionStore:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, idle_s: float, absolute_s: float
    ) -> None:
        self.client = client
        self.keys = keys
        self.idle_s = idle_s
        self.absolute_s = absolute_s

    async def create(
        self, principal: str, token: str, *, expires_at: float | None = None
    ) -> tuple[str, Session]:
        """A new session; its id (for the cookie) and the session."""
        session_id = secrets.token_urlsafe(32)
        created = time.time()
        ends = created + self.absolute_s
        if expires_at is not None:
            ends = min(ends, expires_at)
        session = Session(principal, token, secrets.token_urlsafe(32), created, ends)
        ttl_ms = max(1, int(min(self.idle_s, ends - created) * 1000))
        await guarded(
            self.client.set(_key(self.keys, session_id), msgspec.json.encode(session), px=ttl_ms)
        )
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """The live session of this id (its idle timeout starts again), or None."""
        if not session_id or len(session_id) > 128:
            return None
        key = _key(self.keys, session_id)
        raw: Any = await guarded(self.client.get(key))
        if raw is None:
            return None
        session = msgspec.json.decode(raw, type=Session)
        left = session.ends - time.time()
        if left <= 0:
            await guarded(self.client.delete(key))
            return None
        await guarded(self.client.pexpire(key, max(1, int(min(self.idle_s, left) * 1000))))
        return session

    async def end(self, session_id: str) -> None:
        if session_id and len(session_id) <= 128:
            await guarded(self.client.delete(_key(self.keys, session_id)))


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), (sent or "").encode())
