"""The composition root: every long-lived resource, built once and closed once."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from app.settings import Settings
from app.writes import Writer
from events.redis_log import Keys, RedisEventLog, connect, guarded
from events.storage import LocalStorage
from projections.query import QueryEngine, QueryLimits
from projections.reader import CatalogReader
from projections.runner import CatalogProjector
from projections.store import CATALOG, SnapshotStore

LAG_LUA = """
local ckpt = redis.call('GET', KEYS[2]) or '0-0'
local pending = redis.call('XRANGE', KEYS[1], '(' .. ckpt, '+', 'COUNT', ARGV[1])
if #pending == 0 then return {0, ''} end
return {#pending, pending[1][1]}
"""
LAG_CAP = 10_000


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    log: RedisEventLog
    store: SnapshotStore
    reader: CatalogReader
    storage: LocalStorage
    writer: Writer
    engine: QueryEngine

    @classmethod
    def build(cls, settings: Settings, redis_url: str) -> Services:
        client = connect(redis_url)
        keys = Keys(settings.redis_prefix)
        log = RedisEventLog(client, keys, idempotency_ttl_s=settings.idempotency_ttl_s)
        store = SnapshotStore(client, keys)
        reader = CatalogReader(log, store)
        storage = LocalStorage(settings.storage_root)
        writer = Writer(
            log,
            reader,
            storage,
            row_group_rows=settings.row_group_rows,
            zstd_level=settings.zstd_level,
            retries=settings.write_retries,
        )
        limits = QueryLimits(
            default_rows=settings.query_default_limit,
            max_rows=settings.query_max_limit,
            default_timeout_s=settings.query_timeout_s,
            max_timeout_s=settings.query_max_timeout_s,
            max_result_bytes=settings.query_max_result_bytes,
            threads=settings.query_threads,
            memory_limit=settings.query_memory_limit,
            max_temp_bytes=settings.query_max_temp_bytes,
            max_sql_chars=settings.query_max_sql_chars,
            concurrency=settings.query_concurrency,
        )
        engine = QueryEngine(storage.engine_path, limits, settings.data_dir / "tmp" / "query")
        return cls(settings, client, keys, log, store, reader, storage, writer, engine)

    def projector(self) -> CatalogProjector:
        return CatalogProjector(
            self.redis, self.keys, self.store, batch=self.settings.projection_batch
        )

    async def close(self) -> None:
        await self.redis.aclose()

    async def projection_lag(self) -> dict[str, float | int]:
        """Events not yet in the stored snapshots, and the age of the oldest one."""
        script = self.redis.register_script(LAG_LUA)
        registry = await self.reader.registry()
        units = [(self.keys.registry_stream, f"{self.keys.registry_tag}:ckpt:{CATALOG}")]
        for org in registry.orgs.values():
            for sup in org.supers:
                units.append(
                    (self.keys.stream(org.name, sup), self.keys.checkpoint(org.name, sup, CATALOG))
                )
        events, oldest_ms = 0, None
        for stream, ckpt in units:
            count, first = await guarded(script(keys=[stream, ckpt], args=[LAG_CAP]))
            events += int(count)
            if count:
                ms = int((first.decode() if isinstance(first, bytes) else first).split("-")[0])
                oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        seconds = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        return {"lag_events": events, "lag_seconds": round(seconds, 3)}
