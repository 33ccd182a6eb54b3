"""The composition root: every long-lived resource, built once and closed once."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import anyio
import redis.asyncio as aioredis

from app.access.auth import AuthStore, JwtConfig
from app.access.sessions import SessionStore
from app.settings import MIRROR_FORMATS, Settings
from app.write.append import Writer
from app.write.changes.commit import Target
from app.write.changes.mutator import Mutator
from events.archive import Archive
from events.errors import InvalidInput, LedgerError
from events.redis_log import Keys, RedisEventLog, connect, guarded
from events.storage.local import LocalStorage
from events.storage.port import Storage
from mirrors.status import MirrorInfo, MirrorStatuses
from mirrors.status import group as mirror_group
from projections.archiver import ARCHIVE, Archiver
from projections.catalog import SuperState, TableState
from projections.query.analysis import parse_time
from projections.query.engine import QueryEngine
from projections.query.types import Analysis, QueryLimits, Resolver, ViewSource
from projections.reader import CatalogReader
from projections.runner import CatalogProjector
from projections.store import CATALOG, SnapshotStore

if TYPE_CHECKING:
    from mirrors.runner import MirrorRunner

LAG_LUA = """
local ckpt = redis.call('GET', KEYS[2]) or '0-0'
local pending = redis.call('XRANGE', KEYS[1], '(' .. ckpt, '+', 'COUNT', ARGV[1])
if #pending == 0 then return {0, ''} end
return {#pending, pending[1][1]}
"""
LAG_CAP = 10_000
log = logging.getLogger("ledgerlake.services")


# The catalog projector commits a snapshot at most this long after the first event it
# folds (requests fold the tail past the snapshot, so nobody waits for it).
PROJECTION_COMMIT_DELAY_S = 0.25


@dataclass
class Services:
    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    log: RedisEventLog
    store: SnapshotStore
    reader: CatalogReader
    storage: Storage
    writer: Writer
    engine: QueryEngine
    mutator: Mutator
    auth: AuthStore

    @classmethod
    def build(cls, settings: Settings, redis_url: str | None = None) -> Services:
        """``redis_url``: the embedded server's; None means what the settings say."""
        client = connect(settings.redis_target(redis_url))
        keys = Keys(settings.redis_prefix)
        storage = open_storage(settings)
        log = RedisEventLog(
            client, keys, idempotency_ttl_s=settings.idempotency_ttl_s, archive=Archive(storage)
        )
        store = SnapshotStore(client, keys)
        reader = CatalogReader(log, store)
        writer = Writer(
            log,
            reader,
            storage,
            row_group_rows=settings.row_group_rows,
            zstd_level=settings.zstd_level,
            retries=settings.write_retries,
            max_file_age_s=settings.gc_grace_s / 2,
            inline_max_rows=settings.inline_max_rows,
            inline_max_bytes=settings.inline_max_bytes,
            mirrors=settings.mirror_formats,
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
            grace_s=settings.query_kill_after_s,
            worker_address_space=settings.query_worker_memory_bytes,
        )
        engine = QueryEngine(
            storage.engine_path,
            limits,
            settings.data_dir / "tmp" / "query",
            s3_secret=storage.engine_secret if settings.storage_url else None,
            extension_dir=settings.data_dir / "duckdb_extensions",
        )
        mutator = Mutator(
            writer,
            engine,
            retries=settings.merge_retries,
            compact_small_bytes=settings.compact_small_bytes,
            compact_target_bytes=settings.compact_target_bytes,
            compact_min_files=settings.compact_min_files,
            deletion_vectors=settings.deletion_vectors,
            deletion_max_ratio=settings.deletion_max_ratio,
            compact_deleted_ratio=settings.compact_deleted_ratio,
            key_index_rows=settings.key_index_rows,
            inline_flush_rows=settings.inline_flush_rows,
            inline_flush_bytes=settings.inline_flush_bytes,
            inline_flush_files=settings.inline_flush_files,
        )
        writer.on_inline = mutator.after_inline_write
        auth = AuthStore(client, keys, jwt_config(settings))
        return cls(
            settings, client, keys, log, store, reader, storage, writer, engine, mutator, auth
        )

    @cached_property
    def sessions(self) -> SessionStore:
        """The web console's sessions (in Redis: every process knows them)."""
        return SessionStore(
            self.redis,
            self.keys,
            idle_s=self.settings.console_idle_s,
            absolute_s=self.settings.console_absolute_s,
        )

    async def start(self) -> None:
        """Open what needs an event loop (the object storage client)."""
        await self.storage.start()

    async def tables(self, selector: str = "") -> list[tuple[str, str, str]]:
        """(org, super, table) of every table, or of those under ``org``,
        ``org/super`` or ``org/super/table``."""
        parts = [p for p in selector.split("/") if p] if selector else []
        registry = await self.reader.registry()
        out = []
        for org in sorted(registry.orgs):
            if parts and org != parts[0]:
                continue
            for sup in sorted(registry.orgs[org].supers):
                if len(parts) > 1 and sup != parts[1]:
                    continue
                state = await self.reader.super_state(org, sup)
                for table in sorted(state.tables):
                    if len(parts) > 2 and table != parts[2]:
                        continue
                    out.append((org, sup, table))
        return out

    async def compact_forever(self, interval_s: float) -> None:
        """The background compaction policy: every ``interval_s``, compact every table
        that has something to merge. Failures are logged; the loop goes on. Of the
        processes sharing the Redis (``serve --workers``, pods), one per interval
        compacts: the one that takes the round's lease."""
        while True:
            await anyio.sleep(interval_s)
            try:
                if not await self.compaction_turn(interval_s):
                    continue
                for org, sup, table in await self.tables():
                    try:
                        await self.mutator.compact(Target(org, sup, table, actor="ledgerlake"))
                    except LedgerError as exc:
                        log.warning("compacting %s/%s/%s: %s", org, sup, table, exc.message)
            except Exception:
                log.exception("background compaction failed; retrying next interval")

    async def compaction_turn(self, interval_s: float) -> bool:
        """Whether this process compacts this round: the first of the processes on this
        Redis to ask takes the round's lease, which lapses before the next round."""
        lease = f"{self.keys.prefix}:{{compact}}:lease"
        holder = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        ms = max(1, int(interval_s * 900))
        return bool(await self.redis.set(lease, holder, nx=True, px=ms))

    def views(
        self,
        org: str,
        super_: str,
        state: SuperState,
        *,
        as_of_version: int | None = None,
        as_of_time: str | None = None,
    ) -> Resolver:
        """Which version of each table a query reads: ``t AT (VERSION => n)`` in the
        SQL, else ``as_of_version`` / ``as_of_time``, else the current one."""
        if as_of_version is not None and as_of_time is not None:
            raise InvalidInput(
                "give as_of_version or as_of_time, not both", code="invalid_time_travel"
            )
        at_time = parse_time(as_of_time) if as_of_time is not None else None

        async def resolve(analysis: Analysis) -> dict[str, ViewSource]:
            plain = {
                r.name
                for r in analysis.refs
                if r.version is None and r.time is None and r.name in state.tables
            }
            if as_of_version is not None and len(plain) != 1:
                raise InvalidInput(
                    "as_of_version needs a query over exactly one table; for several, "
                    "use t AT (VERSION => n) per table, or as_of_time",
                    code="invalid_time_travel",
                )
            views: dict[str, ViewSource] = {}
            for ref in analysis.refs:
                if ref.name not in state.tables:
                    continue  # a CTE's name, or a missing table DuckDB will report
                version, at = ref.version, ref.time
                if version is None and at is None:
                    version, at = as_of_version, at_time
                if version is None and at is None:
                    views[ref.view] = state.tables[ref.name]
                else:
                    views[ref.view] = await self.reader.table_at(
                        org, super_, ref.name, version=version, at=at
                    )
            return views

        return resolve

    def projector(self) -> CatalogProjector:
        return CatalogProjector(
            self.redis,
            self.keys,
            self.store,
            batch=self.settings.projection_batch,
            commit_delay_s=PROJECTION_COMMIT_DELAY_S,
        )

    def mirror_runners(self) -> list[MirrorRunner]:
        """One runner per mirror format (each publishes only the tables that have its
        format enabled)."""
        # Imported here: the mirror libraries take most of a second to load, which every
        # short command (query, ingest...) would pay otherwise.
        from mirrors.access import access_for
        from mirrors.publisher import Publisher
        from mirrors.runner import MirrorRunner

        access = access_for(self.storage)
        runners = []
        for fmt in MIRROR_FORMATS:
            publisher = Publisher(
                fmt,
                self.storage,
                access,
                checkpoint_interval=self.settings.mirror_checkpoint_interval,
                retention_s=self.settings.mirror_retention_s,
                zstd_level=self.settings.zstd_level,
            )
            runners.append(
                MirrorRunner(
                    self.redis,
                    self.keys,
                    self.store,
                    publisher,
                    default_formats=self.settings.mirror_formats,
                    batch=self.settings.projection_batch,
                )
            )
        return runners

    async def reset_mirrors(self) -> int:
        """Forget every mirror status and checkpoint: the runners then publish each
        table's latest version again. A Delta mirror that already holds it gets no new
        commit (a publish compares with the log's last commit); an Iceberg mirror is
        created anew (its pointer lived in the status). Returns the number of supers."""
        registry = await self.reader.registry()
        statuses = MirrorStatuses(self.redis, self.keys)
        count = 0
        for org in registry.orgs.values():
            for sup in org.supers:
                keys = []
                for fmt in MIRROR_FORMATS:
                    keys.append(statuses.key(org.name, sup, fmt))
                    keys.append(self.keys.checkpoint(org.name, sup, mirror_group(fmt)))
                await guarded(self.redis.delete(*keys))
                count += 1
        return count

    def archiver(self) -> Archiver:
        """The runner that copies every stream into the archive."""

        async def supers() -> list[tuple[str, str]]:
            registry = await self.reader.registry()
            return [(o.name, s) for o in registry.orgs.values() for s in o.supers]

        return Archiver(
            self.redis,
            self.keys,
            self.storage,
            supers,
            segment_events=self.settings.archive_segment_events,
            interval_s=self.settings.archive_interval_s,
            retention_s=self.settings.stream_retention_s,
            projections=(CATALOG, *(mirror_group(fmt) for fmt in MIRROR_FORMATS)),
        )

    async def run_projections(self, stop: anyio.Event) -> None:
        """The catalog projection, every mirror runner and the archiver, until ``stop``."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.projector().run, stop)
            for runner in self.mirror_runners():
                tg.start_soon(runner.run, stop)
            if self.settings.archive:
                tg.start_soon(self.archiver().run, stop)

    async def catch_up(self) -> int:
        """Burst mode: drain the catalog projection, then every mirror runner."""
        projector = self.projector()
        applied = await projector.run_until_caught_up()
        await projector.release_all()
        for runner in self.mirror_runners():
            await runner.run_until_caught_up()
            await runner.release_all()
        if self.settings.archive:
            archiver = self.archiver()
            await archiver.archive_once(force=True)
            await archiver.release_all()
        return applied

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, redis_url: str | None = None
    ) -> AsyncIterator[Services]:
        """Build, start and (on exit) close: for the CLI, workers and tests."""
        services = cls.build(settings, redis_url)
        try:
            await services.start()
            yield services
        finally:
            await services.close()

    async def close(self) -> None:
        self.engine.close()
        await self.storage.close()
        await self.redis.aclose()

    async def projection_lag(self, projection: str = CATALOG) -> dict[str, float | int]:
        """Events the projection (``catalog``, or a mirror's group) has not yet
        committed, and the age of the oldest one."""
        registry = await self.reader.registry()
        units = []
        if projection in (CATALOG, ARCHIVE):
            tag = self.keys.registry_tag
            units.append((self.keys.registry_stream, f"{tag}:ckpt:{projection}"))
        if projection == ARCHIVE:
            units.append((self.keys.auth_stream, f"{self.keys.auth_tag}:ckpt:{ARCHIVE}"))
            units.append((self.keys.audit_stream, f"{self.keys.audit_tag}:ckpt:{ARCHIVE}"))
        for org in registry.orgs.values():
            for sup in org.supers:
                units.append(
                    (
                        self.keys.stream(org.name, sup),
                        self.keys.checkpoint(org.name, sup, projection),
                    )
                )
        events, oldest_ms = 0, None
        for stream, ckpt in units:
            count, first_ms = await self._stream_lag(stream, ckpt, LAG_CAP)
            events += count
            if first_ms is not None:
                oldest_ms = first_ms if oldest_ms is None else min(oldest_ms, first_ms)
        seconds = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        return {"lag_events": events, "lag_seconds": round(seconds, 3)}

    async def _stream_lag(self, stream: str, checkpoint: str, cap: int) -> tuple[int, int | None]:
        """Entries of ``stream`` after ``checkpoint`` (up to ``cap``), and the time (ms)
        of the oldest one."""
        script = self.redis.register_script(LAG_LUA)
        count, first = await guarded(script(keys=[stream, checkpoint], args=[cap]))
        if not count:
            return 0, None
        text = first.decode() if isinstance(first, bytes) else first
        return int(count), int(text.split("-")[0])

    async def all_lags(self) -> dict[str, dict[str, float | int]]:
        """The lag of the catalog projection and of each mirror runner."""
        out = {CATALOG: await self.projection_lag()}
        registry = await self.reader.registry()
        statuses = MirrorStatuses(self.redis, self.keys)
        for fmt in MIRROR_FORMATS:
            lag = await self.projection_lag(mirror_group(fmt))
            failed = 0
            for org in registry.orgs.values():
                for sup in org.supers:
                    found = await statuses.of_super(org.name, sup, fmt)
                    failed += sum(1 for status in found.values() if status.error)
            out[mirror_group(fmt)] = {**lag, "failed_tables": failed}
        if self.settings.archive:
            out[ARCHIVE] = await self.projection_lag(ARCHIVE)
        return out

    async def table_mirrors(self, org: str, super_: str, table: TableState) -> list[MirrorInfo]:
        """Each mirror format of a table: whether it is on, where it is, the version it
        reflects and how far behind it is."""
        enabled = table.mirrors if table.mirrors is not None else self.settings.mirror_formats
        statuses = await MirrorStatuses(self.redis, self.keys).of_table(
            org, super_, table.name, MIRROR_FORMATS
        )
        out = []
        for fmt in MIRROR_FORMATS:
            status = statuses.get(fmt)
            if status is not None and status.incarnation != table.incarnation:
                status = None  # the mirror of a dropped table of the same name
            on = fmt in enabled
            reflected = status.version if status is not None and status.version >= 0 else None
            since = reflected if reflected is not None else table.created_version - 1
            behind = table.version - since if on else 0
            seconds = 0.0
            if behind > 0:
                unit = await self._unit_lag(org, super_, mirror_group(fmt))
                seconds = max(unit, time.time() - table.updated_at.timestamp())
            out.append(
                MirrorInfo(
                    format=fmt,
                    enabled=on,
                    location=status.location if status else None,
                    metadata_location=status.metadata_location if status else None,
                    version=reflected,
                    lag_versions=max(0, behind),
                    lag_seconds=round(seconds, 3),
                    published_at=status.published_at if status else None,
                    error=status.error if status else None,
                    note=status.note if status else None,
                )
            )
        return out

    async def _unit_lag(self, org: str, super_: str, projection: str) -> float:
        stream, ckpt = self.keys.stream(org, super_), self.keys.checkpoint(org, super_, projection)
        _count, first_ms = await self._stream_lag(stream, ckpt, 1)
        return 0.0 if first_ms is None else max(0.0, time.time() - first_ms / 1000)


def jwt_config(settings: Settings) -> JwtConfig:
    public_key = settings.jwt_public_key_file.read_text() if settings.jwt_public_key_file else None
    return JwtConfig(
        hs256_secret=settings.jwt_hs256_secret,
        public_key=public_key,
        jwks_url=settings.jwt_jwks_url,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        required_scopes=tuple(settings.jwt_required_scopes.replace(",", " ").split()),
    )


def open_storage(settings: Settings) -> Storage:
    """The local directory, or the S3 bucket of ``LEDGERLAKE_STORAGE_URL``."""
    if not settings.storage_url:
        return LocalStorage(settings.storage_root)
    from events.storage.s3 import S3Location, S3Storage  # (aioboto3 loads only for S3)

    location = S3Location.from_url(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region or "us-east-1",
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        session_token=settings.s3_session_token,
        path_style=settings.s3_path_style,
        create_bucket=settings.s3_create_bucket,
        part_size=settings.s3_part_size,
        max_attempts=settings.s3_max_attempts,
    )
    return S3Storage(location, settings.data_dir / "staging")
