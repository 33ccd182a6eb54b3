"""Redis Streams adapter for the ``EventLog`` port.

Layout (every key of one super shares the hash tag ``{org/super}``, so each Lua script
touches a single Cluster slot):

    <p>:{org/super}:events        the super's event stream
    <p>:{org/super}:ver           hash: table -> current version
    <p>:{org/super}:idem:<sha>    hash: fingerprint, version, ids, result (expires)
    <p>:{registry}:events         registry stream (OrgCreated, SuperCreated)
    <p>:{registry}:orgs|supers    sets backing the registry's "create once" check
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.archive import Archive, event_of, super_stream
from events.errors import ConflictError, IdempotencyMismatch, Unavailable
from events.log import NEW_TABLE, Appended, Idempotency, StoredResult
from events.model import Event, EventBase, decode_event, encode_event, stream_id_tuple

T = TypeVar("T")
# Failures that mean "Redis is not reachable right now" (a Cluster losing a master or
# resharding included): 503 and retry, never a 500.
_UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    RedisClusterException,
    TryAgainError,
)

APPEND_LUA = """
-- KEYS: stream, versions, idempotency key (a same-slot placeholder when unused)
-- ARGV: table, expected version, fingerprint ('' = none), ttl, result, n, then
--       (type, schema version, payload) per event
local tbl = ARGV[1]
local expected = ARGV[2]
local fp = ARGV[3]
if fp ~= '' then
  local prev = redis.call('HMGET', KEYS[3], 'fp', 'version', 'ids', 'result')
  if prev[1] then return {'idem', prev[1], prev[2], prev[3], prev[4]} end
end
-- The versions hash holds a live table's version, or 'x<v>' for a name whose table
-- was dropped at version v; ARGV[2] must be exactly that ('-1': no table ever).
local cur = redis.call('HGET', KEYS[2], tbl)
local dropped = cur and string.sub(cur, 1, 1) == 'x'
if (cur or '-1') ~= expected then
  local curv = -1
  if cur and not dropped then curv = tonumber(cur) end
  return {'conflict', tostring(curv)}
end
local curv = -1
if cur then
  if dropped then curv = tonumber(string.sub(cur, 2)) else curv = tonumber(cur) end
end
local n = tonumber(ARGV[6])
local ids = {}
local i = 7
-- A client's Idempotency-Key rides on the append's last entry ('i'), so that a log
-- recovered from the archive can answer its retries too.
local idemf = ARGV[7 + 3 * n] or ''
for k = 1, n do
  if k == n and idemf ~= '' then
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'v', ARGV[i + 1],
                               'tb', tbl, 'e', ARGV[i + 2], 'i', idemf)
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 't', ARGV[i], 'v', ARGV[i + 1],
                               'tb', tbl, 'e', ARGV[i + 2])
  end
  i = i + 3
end
local newv = curv + n
if ARGV[7 + 3 * (n - 1)] == 'TableDropped' then
  -- The name is free, and its versions go on: a table created under it later starts
  -- at newv + 1, so no version (or If-Match) of the old table can match the new one.
  redis.call('HSET', KEYS[2], tbl, 'x' .. newv)
else
  redis.call('HSET', KEYS[2], tbl, newv)
end
local joined = table.concat(ids, ',')
if fp ~= '' then
  redis.call('HSET', KEYS[3], 'fp', fp, 'version', newv, 'ids', joined, 'result', ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
end
return {'ok', tostring(newv), joined}
"""

READ_LUA = """
-- KEYS: a super's stream, its trimmed mark. ARGV: start (id or (id), count.
-- The mark and the entries in one step, so that a trim cannot fall between them.
return {redis.call('GET', KEYS[2]) or false,
        redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""

# Reads of more entries than this take the mark with a MULTI instead of the script.
LONG_READ = 200

REGISTRY_LUA = """
-- KEYS: registry stream, orgs set, supers set
-- ARGV: org, org/super, (type, version, payload) for OrgCreated, then for SuperCreated
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[1], '*', 't', ARGV[3], 'v', ARGV[4], 'tb', '', 'e', ARGV[5])
end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('XADD', KEYS[1], '*', 't', ARGV[6], 'v', ARGV[7], 'tb', '', 'e', ARGV[8])
return 1
"""


class Keys:
    """Key names under a configurable prefix (tests use one prefix per test)."""

    def __init__(self, prefix: str = "ll") -> None:
        self.prefix = prefix

    def tag(self, org: str, super_: str) -> str:
        return f"{self.prefix}:{{{org}/{super_}}}"

    def stream(self, org: str, super_: str) -> str:
        return f"{self.tag(org, super_)}:events"

    def versions(self, org: str, super_: str) -> str:
        return f"{self.tag(org, super_)}:ver"

    def idempotency(self, org: str, super_: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.tag(org, super_)}:idem:{digest}"

    def trimmed(self, org: str, super_: str) -> str:
        """The lowest id still in the super's stream once it was trimmed: every entry
        below it is in the archive only."""
        return f"{self.tag(org, super_)}:trimmed"

    def snapshot(self, org: str, super_: str) -> str:
        return f"{self.tag(org, super_)}:snap"

    def checkpoint(self, org: str, super_: str, projection: str) -> str:
        return f"{self.tag(org, super_)}:ckpt:{projection}"

    def lease(self, org: str, super_: str, projection: str) -> str:
        return f"{self.tag(org, super_)}:lease:{projection}"

    @property
    def auth_tag(self) -> str:
        return f"{self.prefix}:{{auth}}"

    @property
    def auth_stream(self) -> str:
        """Principals, tokens, grants and roles (``app/access/auth.py``)."""
        return f"{self.auth_tag}:events"

    @property
    def audit_tag(self) -> str:
        return f"{self.prefix}:{{audit}}"

    @property
    def audit_stream(self) -> str:
        """The query audit records (``app/access/audit.py``)."""
        return f"{self.audit_tag}:reads"

    @property
    def registry_tag(self) -> str:
        return f"{self.prefix}:{{registry}}"

    @property
    def registry_stream(self) -> str:
        return f"{self.registry_tag}:events"

    @property
    def registry_orgs(self) -> str:
        return f"{self.registry_tag}:orgs"

    @property
    def registry_supers(self) -> str:
        return f"{self.registry_tag}:supers"

    @property
    def writer_grace(self) -> str:
        """The largest gc grace period any writer was started with (seconds)."""
        return f"{self.registry_tag}:writer_grace_s"


async def guarded(call: Awaitable[T]) -> T:
    """Await a Redis call, turning connection failures into ``Unavailable``."""
    try:
        return await call
    except _UNREACHABLE as exc:
        raise Unavailable(f"the event log (Redis) is unreachable: {exc}") from exc


@dataclass(frozen=True)
class RedisTarget:
    """Where the log lives: a URL (``redis://``, ``rediss://`` with TLS, ``unix://``; a
    password goes in the URL), a Sentinel-managed master, or a Cluster."""

    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    sentinel_password: str | None = None
    password: str | None = None
    cluster: bool = False


def connect(target: RedisTarget | str) -> aioredis.Redis:
    """A Redis client for the target. Every key of one super shares a hash tag, so the
    same client code works on a Cluster (each Lua script touches one slot)."""
    if isinstance(target, str):
        target = RedisTarget(url=target)
    # A few quick retries ride out a reconnect; more would only delay the 503 a client
    # gets while Redis is down (redis-py's default is 10 with backoff, ~4 s).
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    }
    if target.sentinels:
        sentinel_cls: Any = Sentinel  # untyped in redis-py
        sentinel = sentinel_cls(
            list(target.sentinels),
            sentinel_kwargs={"password": target.sentinel_password, "socket_connect_timeout": 5},
            password=target.password,
            **options,
        )
        master: aioredis.Redis = sentinel.master_for(target.sentinel_master)
        return master
    if target.cluster:
        cluster: Any = RedisCluster.from_url(
            target.url, decode_responses=False, socket_connect_timeout=5
        )
        return cast(aioredis.Redis, cluster)
    client: aioredis.Redis = aioredis.Redis.from_url(
        target.url, health_check_interval=15, **options
    )
    return client


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """A stream entry's fields as Lua returns them (a flat list) as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _b(value: bytes | str | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class RedisEventLog:
    """The ``EventLog`` port on Redis Streams, with Lua for atomic appends."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        idempotency_ttl_s: int = 86400,
        archive: Archive | None = None,
    ):
        self.client = client
        self.keys = keys
        # Where the events trimmed from the super streams are (None: nothing is trimmed).
        self.archive = archive
        self.idempotency_ttl_s = idempotency_ttl_s
        self._append: Callable[..., Awaitable[Any]] = client.register_script(APPEND_LUA)
        self._registry: Callable[..., Awaitable[Any]] = client.register_script(REGISTRY_LUA)
        self._read_marked: Callable[..., Awaitable[Any]] = client.register_script(READ_LUA)

    async def append(
        self,
        org: str,
        super_: str,
        table: str,
        events: Sequence[EventBase],
        *,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Appended:
        idem_key = (
            self.keys.idempotency(org, super_, idempotency.key)
            if idempotency
            else f"{self.keys.tag(org, super_)}:idem:-"
        )
        token = str(expected_version)
        if expected_version == NEW_TABLE:
            # A name whose table was dropped: the new table continues its versions.
            raw = await guarded(self.client.hget(self.keys.versions(org, super_), table))
            marker = _s(raw)
            if marker.startswith("x"):
                token = marker
                shift = int(marker[1:]) + 1
                events = [msgspec.structs.replace(e, version=e.version + shift) for e in events]
        args: list[Any] = [
            table,
            token,
            idempotency.fingerprint if idempotency else "",
            (idempotency.ttl_s if idempotency else None) or self.idempotency_ttl_s,
            idempotency.result if idempotency else b"",
            len(events),
        ]
        for event in events:
            fields = encode_event(event)
            args += [fields["t"], fields["v"], fields["e"]]
        args.append(self._idempotency_field(idem_key, idempotency, len(events)))
        keys = [self.keys.stream(org, super_), self.keys.versions(org, super_), idem_key]
        reply = await guarded(self._append(keys=keys, args=args))
        status = _s(reply[0])
        if status == "conflict":
            current = int(_s(reply[1]))
            raise ConflictError(
                f"table {org}/{super_}/{table} is at version {current}, not {expected_version}",
                current_version=current,
            )
        if status == "idem":
            stored = StoredResult(
                fingerprint=_s(reply[1]),
                version=int(_s(reply[2])),
                event_ids=tuple(_s(reply[3]).split(",")),
                result=_b(reply[4]),
            )
            return self._replay(stored, idempotency)
        return Appended(
            version=int(_s(reply[1])),
            event_ids=tuple(_s(reply[2]).split(",")),
            result=idempotency.result if idempotency else b"",
        )

    def _idempotency_field(
        self, idem_key: str, idempotency: Idempotency | None, count: int
    ) -> bytes:
        """What the append's last entry carries of a client's Idempotency-Key (our own
        tokens only matter to the running process): the record's key, the fingerprint,
        the result and the number of events, for ``recover`` to rebuild the record."""
        if idempotency is None or idempotency.ttl_s is not None:
            return b""
        return msgspec.json.encode({
            "key": idem_key.rsplit(":", 1)[-1], "fp": idempotency.fingerprint,
            "result": idempotency.result.decode(), "n": count, "ttl": self.idempotency_ttl_s,
        })  # fmt: skip

    @staticmethod
    def _replay(stored: StoredResult, idempotency: Idempotency | None) -> Appended:
        if idempotency is None or stored.fingerprint != idempotency.fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used for a different request"
            )
        return Appended(
            version=stored.version, event_ids=stored.event_ids, result=stored.result, replayed=True
        )

    async def stored_result(self, org: str, super_: str, key: str) -> StoredResult | None:
        raw = await guarded(
            self.client.hmget(
                self.keys.idempotency(org, super_, key), "fp", "version", "ids", "result"
            )
        )
        if raw[0] is None:
            return None
        return StoredResult(
            fingerprint=_s(raw[0]),
            version=int(_s(raw[1])),
            event_ids=tuple(_s(raw[2]).split(",")),
            result=_b(raw[3]),
        )

    async def ensure_super(
        self, org: str, super_: str, org_event: EventBase, super_event: EventBase
    ) -> None:
        if await guarded(self.client.sismember(self.keys.registry_supers, f"{org}/{super_}")):
            return
        o, s = encode_event(org_event), encode_event(super_event)
        keys = [self.keys.registry_stream, self.keys.registry_orgs, self.keys.registry_supers]
        args = [org, f"{org}/{super_}", o["t"], o["v"], o["e"], s["t"], s["v"], s["e"]]
        await guarded(self._registry(keys=keys, args=args))

    async def read(
        self, org: str, super_: str, *, after: str = "0-0", count: int = 1000
    ) -> list[Event]:
        return await self._range_super(org, super_, f"({after}", count)

    async def read_registry(self, *, after: str = "0-0", count: int = 1000) -> list[Event]:
        return await self._read(self.keys.registry_stream, after, count)

    async def read_from(self, org: str, super_: str, start: str, *, count: int) -> list[Event]:
        """Events of a super from ``start`` (an id, inclusive, or ``(id``, exclusive)."""
        return await self._range_super(org, super_, start, count)

    async def read_registry_from(self, start: str, *, count: int) -> list[Event]:
        return await self._range(self.keys.registry_stream, start, count)

    async def _read(self, stream: str, after: str, count: int) -> list[Event]:
        return await self._range(stream, f"({after}", count)

    async def _range(self, stream: str, start: str, count: int) -> list[Event]:
        call: Any = self.client.xrange(stream, min=start, max="+", count=count)
        entries: list[Any] = await guarded(call)
        return [decode_event(entry_id, fields) for entry_id, fields in entries]

    async def _marked_range(
        self, keys: list[str], start: str, count: int
    ) -> tuple[Any, list[tuple[Any, dict[Any, Any]]]]:
        """The trimmed mark and up to ``count`` entries from ``start``, atomically. A
        short read (a request's tail) is one script call; a long one (replay,
        catch-up: the script found at least ``LONG_READ`` entries) is then a MULTI of
        GET and XRANGE, which Redis serves at about half the cost per entry of a
        script returning thousands of entries, and without blocking other clients
        for as long."""
        mark, flat = await self._read_marked(keys=keys, args=[start, min(count, LONG_READ)])
        if count <= LONG_READ or len(flat) < LONG_READ:
            # All there is (a request's tail is usually empty): one script call.
            return mark, [(entry_id, _pairs(fields)) for entry_id, fields in flat]
        pipe: Any = self.client.pipeline(transaction=True)
        pipe.get(keys[1])
        pipe.xrange(keys[0], min=start, max="+", count=count)
        mark, entries = await pipe.execute()
        return mark, entries

    async def _range_super(self, org: str, super_: str, start: str, count: int) -> list[Event]:
        """A super's events from ``start``, as one log: those trimmed from the stream
        come from the archive (events below the stream's ``trimmed`` mark), the rest
        from Redis. Each Redis read takes the mark and the entries in one script;
        if the mark moved while the archive was read (a trim in between), the archive
        is read again up to the new mark, so no event falls between the two."""
        stream = self.keys.stream(org, super_)
        if self.archive is None:
            return await self._range(stream, start, count)
        name = super_stream(org, super_)
        out: list[Event] = []
        exclusive = start.startswith("(")
        position = start.lstrip("(") if start not in ("-", "(-") else "0-0"
        while True:
            first = f"({position}" if exclusive else position
            keys = [stream, self.keys.trimmed(org, super_)]
            mark, entries = await guarded(self._marked_range(keys, first, count - len(out)))
            if mark is None or stream_id_tuple(position) >= stream_id_tuple(_s(mark)):
                out += [decode_event(entry_id, fields) for entry_id, fields in entries]
                return out
            # Part of the range was trimmed: the archive has it (everything below the
            # mark); then the loop reads Redis again from there.
            limit = stream_id_tuple(_s(mark))
            async for entry in self.archive.entries(name, position, inclusive=not exclusive):
                if stream_id_tuple(entry[0]) >= limit or len(out) == count:
                    break
                out.append(event_of(entry))
            if len(out) == count:
                return out
            # Everything below the mark is in ``out`` now: go on from the mark itself.
            position, exclusive = _s(mark), False


# The largest grace period (seconds) a writer was started with: gc refuses a shorter one
# (app/ops/gc.py), since a writer re-uploads a file only after half of *its* grace.
RECORD_GRACE_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


async def record_writer_grace(client: Any, keys: Keys, grace_s: float) -> None:
    """Called by every service at start: gc must never use a shorter grace period."""
    await guarded(client.eval(RECORD_GRACE_LUA, 1, keys.writer_grace, grace_s))


async def writer_grace(client: Any, keys: Keys) -> float:
    raw = await guarded(client.get(keys.writer_grace))
    return float(raw) if raw else 0.0
