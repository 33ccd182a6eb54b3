"""Snapshot store: projection state and its checkpoint, written in one atomic step.

A snapshot is a Redis hash in the super's slot (one field per table, so a commit
rewrites only the tables that changed); the checkpoint is the id of the last event
folded in. ``commit`` is one Lua script that checks the checkpoint it started from
(compare-and-set, so two runners can never both commit the same step), writes the
changed fields, moves the checkpoint and acknowledges the consumer-group entries.
Either all of that happens or none of it: a kill -9 at any point loses nothing and
applies nothing twice.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from events.redis_log import Keys, guarded
from projections.catalog import RegistryState, SuperState, TableState

COMMIT_LUA = """
-- KEYS: snapshot hash, checkpoint, stream
-- ARGV: expected checkpoint, new checkpoint, group ('' = none), events folded (-1 = do
--       not check), n set, fields..., n del, fields..., n ack, ids...
local cur = redis.call('GET', KEYS[2]) or '0-0'
if cur ~= ARGV[1] then return 0 end
local folded = tonumber(ARGV[4])
if folded >= 0 and ARGV[2] ~= cur then
  -- every entry between the two checkpoints must have been folded: no gaps
  local between = redis.call('XRANGE', KEYS[3], '(' .. cur, ARGV[2])
  if #between ~= folded then return -1 end
end
local i = 5
local nset = tonumber(ARGV[i]); i = i + 1
for _ = 1, nset do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]); i = i + 2
end
local ndel = tonumber(ARGV[i]); i = i + 1
for _ = 1, ndel do
  redis.call('HDEL', KEYS[1], ARGV[i]); i = i + 1
end
redis.call('SET', KEYS[2], ARGV[2])
local nack = tonumber(ARGV[i]); i = i + 1
if ARGV[3] ~= '' then
  local last = i + nack - 1
  while i <= last do  -- in chunks: unpack() has a limit on its results
    local j = math.min(i + 499, last)
    redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, i, j))
    i = j + 1
  end
end
return 1
"""

REGISTRY_FIELD = "__registry__"
CATALOG = "catalog"

_table_decoder = msgspec.json.Decoder(TableState)
_registry_decoder = msgspec.json.Decoder(RegistryState)
_encoder = msgspec.json.Encoder(decimal_format="string")


def encode_table(table: TableState) -> bytes:
    return _encoder.encode(table)


class CommitOutcome(enum.IntEnum):
    """What a commit did: written, refused because the checkpoint moved, or refused
    because the events folded were not every event since the checkpoint."""

    GAP = -1
    MOVED = 0
    DONE = 1


class SnapshotStore:
    """Loads and commits catalog snapshots for supers and for the registry."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._commit: Callable[..., Awaitable[Any]] = client.register_script(COMMIT_LUA)

    def _super_keys(self, org: str, super_: str) -> list[str]:
        k = self.keys
        return [
            k.snapshot(org, super_),
            k.checkpoint(org, super_, CATALOG),
            k.stream(org, super_),
        ]

    def _registry_keys(self) -> list[str]:
        tag = self.keys.registry_tag
        return [f"{tag}:snap", f"{tag}:ckpt:{CATALOG}", self.keys.registry_stream]

    async def _load(self, keys: list[str]) -> tuple[dict[bytes, bytes], str]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys[0])
            pipe.get(keys[1])
            fields, ckpt = await guarded(pipe.execute())
        return fields, (ckpt or b"0-0").decode()

    async def load_super(self, org: str, super_: str) -> SuperState:
        fields, ckpt = await self._load(self._super_keys(org, super_))
        tables = {name.decode(): _table_decoder.decode(raw) for name, raw in fields.items()}
        return SuperState(org=org, name=super_, tables=dict(sorted(tables.items())), position=ckpt)

    async def load_registry(self) -> RegistryState:
        fields, ckpt = await self._load(self._registry_keys())
        raw = fields.get(REGISTRY_FIELD.encode())
        state = _registry_decoder.decode(raw) if raw else RegistryState()
        return msgspec.structs.replace(state, position=ckpt)

    async def commit_super(
        self,
        state: SuperState,
        *,
        expected: str,
        changed: Iterable[str],
        removed: Iterable[str] = (),
        group: str = "",
        acks: Iterable[str] = (),
        folded: int = -1,
    ) -> CommitOutcome:
        """Write the changed tables and the checkpoint if the stored checkpoint is still
        ``expected`` and (when ``folded`` >= 0) exactly ``folded`` events lie between the
        two checkpoints. Otherwise write nothing and say why."""
        changed = list(changed)
        sets = [(n, encode_table(state.tables[n])) for n in changed if n in state.tables]
        dropped = [n for n in changed if n not in state.tables]
        return await self.commit_hash(
            self._super_keys(state.org, state.name),
            (expected, state.position, group, folded),
            sets,
            [*removed, *dropped],
            list(acks),
        )

    async def commit_registry(
        self,
        state: RegistryState,
        *,
        expected: str,
        group: str = "",
        acks: Iterable[str] = (),
        folded: int = -1,
    ) -> CommitOutcome:
        snapshot = _encoder.encode(msgspec.structs.replace(state, position=""))
        sets = [(REGISTRY_FIELD, snapshot)]
        return await self.commit_hash(
            self._registry_keys(), (expected, state.position, group, folded), sets, [], list(acks)
        )

    async def commit_hash(
        self,
        keys: list[str],
        head: tuple[str, str, str, int],
        sets: list[tuple[str, bytes]],
        removed: list[str],
        acks: list[str],
    ) -> CommitOutcome:
        """The atomic step, for any projection kept as a hash: ``keys`` are the hash,
        the checkpoint and the stream; ``head`` is (expected checkpoint, new checkpoint,
        consumer group, events folded)."""
        args: list[Any] = [*head, len(sets)]
        for name, value in sets:
            args += [name, value]
        args += [len(removed), *removed, len(acks), *acks]
        return CommitOutcome(int(await guarded(self._commit(keys=keys, args=args))))
