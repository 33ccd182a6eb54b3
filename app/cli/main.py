"""The ``ledgerlake`` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from app.logs import setup_logging
from app.ops.embedded_redis import EmbeddedRedis
from app.services import Services
from app.settings import Settings
from events.errors import LedgerError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: the configured one, or the embedded server of the data dir
    (started if it is not running, and stopped on exit if nobody else uses it)."""
    if settings.external_redis:
        yield settings.redis_url or ""  # "" : connect as the settings say (e.g. Sentinel)
        return
    embedded = EmbeddedRedis(
        settings.data_dir, binary=settings.redis_server, appendfsync=settings.redis_appendfsync
    )
    url = embedded.start()
    try:
        yield url
    finally:
        embedded.stop_if_last()


class Progress:
    """A one-line progress report on stderr, at most a few times per second."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit
        self.started = time.monotonic()
        self.last = self.started
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int) -> None:
        t = time.monotonic()
        if t - self.last < 0.5:
            return
        self.last = t
        self._print(done, end="\r" if self.tty else "\n")

    def _print(self, done: int, end: str) -> None:
        rate = done / max(time.monotonic() - self.started, 1e-6)
        print(f"{self.what}: {done:,} {self.unit} ({rate:,.0f}/s)", end=end, file=sys.stderr)

    def finish(self, done: int) -> None:
        self._print(done, end="\n")


def _api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        help="send it to a running Ledgerlake at this URL (e.g. http://host:8000) "
        "instead of working on Redis and storage directly",
    )
    p.add_argument("--token", help="bearer token for --api (default: LEDGERLAKE_TOKEN)")


def _split(value: str, parts: int, what: str) -> list[str]:
    pieces = value.split("/")
    if len(pieces) != parts or not all(pieces):
        raise SystemExit(f"{what} must look like {'/'.join(['name'] * parts)}, not {value!r}")
    return pieces


# -- commands -------------------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.api.app import create_app

    jwt_configured = (
        settings.jwt_hs256_secret or settings.jwt_public_key_file or settings.jwt_jwks_url
    )
    if not is_loopback(settings.host) and not settings.api_token and not jwt_configured:
        raise SystemExit(
            f"refusing to bind {settings.host}: it is not a loopback address and no "
            "authentication is configured (set LEDGERLAKE_API_TOKEN, or a JWT provider "
            "with LEDGERLAKE_JWT_*)"
        )
    with redis_for(settings) as url:
        app = create_app(settings, url, bootstrap=is_loopback(settings.host))
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


async def _until_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    async def main(url: str) -> None:
        async with Services.open(settings, url) as services:
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_signal, stop)
                if settings.compact_interval_s > 0 and not args.burst:
                    tg.start_soon(services.compact_forever, settings.compact_interval_s)
                if args.burst:
                    n = await services.catch_up()
                    print(f"projected {n} events", file=sys.stderr)
                else:
                    await services.run_projections(stop)
                tg.cancel_scope.cancel()

    with redis_for(settings) as url:
        anyio.run(main, url)
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from projections.replay import replay

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            progress = Progress("replayed", "events")
            report = await replay(
                services.log, services.store, verify=args.verify, progress=progress
            )
            progress.finish(report.events)
            for line in report.differences:
                print(f"DIFF {line}", file=sys.stderr)
            verb = "verified" if args.verify else "rebuilt"
            print(
                f"{verb} {report.supers} supers from {report.events} events: "
                f"{len(report.differences)} difference(s)"
            )
            if args.mirrors and not args.verify:
                reset = await services.reset_mirrors()
                print(f"mirrors of {reset} supers will be published again by the runners")
            return 1 if report.differences else 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


def _with_services(settings: Settings, body: Callable[[Services], Awaitable[int]]) -> int:
    """Run ``body`` with the services on the configured (or embedded) Redis."""

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            return await body(services)

    with redis_for(settings) as url:
        return anyio.run(main, url)


def cmd_recover(settings: Settings, args: argparse.Namespace) -> int:
    """Rebuild a lost Redis from the event archive, then every projection."""
    from app.ops.recover import recover

    async def main(services: Services) -> int:
        progress = Progress("recovered", "events")
        report = await recover(services, progress=progress)
        progress.finish(report.events)
        print(
            f"recovered {report.events} events in {report.streams} streams "
            f"({len(report.supers)} supers) and rebuilt the projections; the mirror "
            "runners will publish every table again"
        )
        return 0

    return _with_services(settings, main)


def cmd_rebuild_from_storage(settings: Settings, args: argparse.Namespace) -> int:
    """LOSSY: each table's latest rows from the storage, into an empty Redis."""
    from app.ops.rebuild import rebuild_from_storage

    print(
        "rebuild-from-storage is LOSSY: the history (versions, time travel, the audit "
        "trail), principals, grants and policies are gone; only each table's latest rows "
        "come back",
        file=sys.stderr,
    )

    async def main(services: Services) -> int:
        progress = Progress("rebuilt", "rows")
        report = await rebuild_from_storage(
            services, ignore_archive=args.ignore_archive, progress=progress
        )
        progress.finish(sum(t.rows for t in report.tables))
        for t in report.tables:
            print(f"{t.table}: {t.rows} rows from the {t.source}")
            if t.lossy:
                print(f"  WARNING {t.table}: {t.lossy}", file=sys.stderr)
        for line in report.skipped:
            print(f"  SKIPPED {line}", file=sys.stderr)
        print(f"rebuilt {len(report.tables)} tables (lossy: no history before this point)")
        return 0

    return _with_services(settings, main)


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """Write an org or a super, with its history and data files, to a directory."""
    from app.ops.transfer import export_data

    org, _, sup = args.target.partition("/")

    async def main(services: Services) -> int:
        progress = Progress("exported", "files")
        report = await export_data(services, org, sup or None, Path(args.out),
                                   progress=progress)  # fmt: skip
        progress.finish(report.files)
        print(
            f"exported {', '.join(report.supers)}: {report.events} events, "
            f"{report.files} files ({report.bytes:,} bytes) to {args.out}"
        )
        return 0

    return _with_services(settings, main)


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Add an export to this deployment (refused if one of its supers exists)."""
    from app.ops.transfer import import_data

    async def main(services: Services) -> int:
        progress = Progress("imported", "files")
        report = await import_data(services, Path(args.source), progress=progress)
        progress.finish(report.files)
        print(
            f"imported {', '.join(report.supers)}: {report.events} events, "
            f"{report.files} files; grant access to it in this deployment"
        )
        return 0

    return _with_services(settings, main)


def _api_call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """A request to a running Ledgerlake (``--api``) with ``--token`` (or
    LEDGERLAKE_TOKEN): the server's authentication and authorization apply, exactly as
    for any HTTP client. Exits 1 with the server's error on a refusal."""
    import httpx

    token = args.token or os.environ.get("LEDGERLAKE_TOKEN")
    if not token:
        raise SystemExit("--api needs --token (or LEDGERLAKE_TOKEN)")
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    try:
        response = httpx.request(
            method, args.api.rstrip("/") + path, headers=headers, timeout=300, **kwargs
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {args.api}: {exc}") from exc
    if response.status_code >= 400:
        from app.mcp.client import api_error

        error = api_error(response)
        raise SystemExit(f"{error.status} {error.code}: {error.message}")
    return response


def cmd_mcp(settings: Settings, args: argparse.Namespace) -> int:
    """The MCP server as a client of a running Ledgerlake: over stdio with one token
    (``LEDGERLAKE_TOKEN``), or over streamable HTTP, where each MCP client brings its own
    bearer token. Either way the API decides what each call may do."""
    from app.mcp.server import run_stdio, standalone_app

    url = (args.url or os.environ.get("LEDGERLAKE_URL") or "http://127.0.0.1:8000").rstrip("/")
    if args.transport == "stdio":
        token = args.token or os.environ.get("LEDGERLAKE_TOKEN")
        if not token:
            raise SystemExit(
                "ledgerlake mcp needs LEDGERLAKE_TOKEN: an API token (POST "
                "/v1/principals/{id}/tokens) or a JWT, whose grants the tools will have"
            )
        run_stdio(settings, url, token)
        return 0
    import uvicorn

    host, port = args.host or "127.0.0.1", args.port or 8765
    print(f"MCP endpoint: http://{host}:{port}/mcp (Ledgerlake API: {url})", file=sys.stderr)
    uvicorn.run(
        standalone_app(settings, url), host=host, port=port, log_config=None, access_log=False
    )
    return 0


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    org, sup = _split(args.super, 2, "--super")
    if args.api:
        import pyarrow as pa

        body = {"sql": args.sql, "limit": args.limit, "timeout_s": args.timeout,
                "as_of_version": args.as_of_version, "as_of_time": args.as_of_time}  # fmt: skip
        response = _api_call(
            args,
            "POST",
            f"/v1/{org}/{sup}/query",
            json={k: v for k, v in body.items() if v is not None},
            headers={"Accept": "application/vnd.apache.arrow.stream"},
        )
        _print_table(pa.ipc.open_stream(response.content).read_all(), args.format)
        if response.headers.get("x-ledgerlake-truncated") == "true":
            print("(truncated)", file=sys.stderr)
        return 0

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            state = await services.reader.require_super(org, sup)
            views = services.views(
                org, sup, state, as_of_version=args.as_of_version, as_of_time=args.as_of_time
            )
            result = await services.engine.run(
                views, args.sql, limit=args.limit, timeout_s=args.timeout
            )
            _print_table(result.table, args.format)
            if result.truncated:
                print(f"(truncated at {result.table.num_rows} rows)", file=sys.stderr)
            return 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


def _print_table(table: Any, fmt: str) -> None:
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
        return
    if fmt == "json":
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
        return
    names = table.column_names
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from app.write.bodies import format_for_path
    from app.write.request import IngestRequest

    org, sup, table = _split(args.table, 3, "--table")
    path = Path(args.file)
    if not path.is_file():
        raise SystemExit(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise SystemExit(f"{path} is empty")
    fmt = args.format or format_for_path(path)
    if args.mode == "upsert" and not args.key:
        raise SystemExit("--mode upsert needs --key col[,col...]")
    if args.mode != "upsert" and (args.key or args.newer_than):
        raise SystemExit("--key and --newer-than apply to --mode upsert only")
    if args.api:
        from app.write.bodies import CONTENT_TYPES

        media = next(m for m, f in CONTENT_TYPES.items() if f == fmt)
        params = {"mode": args.mode, "key": args.key, "newer_than": args.newer_than}
        response = _api_call(
            args,
            "POST",
            f"/v1/{org}/{sup}/tables/{table}/rows",
            params={k: v for k, v in params.items() if v},
            content=path.read_bytes(),
            headers={"Content-Type": media},
        )
        print(json.dumps(response.json()))
        return 0

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            if args.mode == "upsert":
                return await _upsert_file(services, org, sup, table, path, fmt, args)
            progress = Progress(f"ingesting {path.name}", "rows")
            result = await services.writer.ingest(
                IngestRequest(
                    org=org,
                    super_=sup,
                    table=table,
                    source=path,
                    fmt=fmt,
                    mode=args.mode,
                    actor="cli",
                    request_id=uuid.uuid4().hex,
                ),
                progress=progress,
            )
            progress.finish(result.rows)
            summary = {"table": result.table, "version": result.version,
                       "rows": result.rows, "event_id": result.event_id}  # fmt: skip
            print(json.dumps(summary))
            return 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


async def _upsert_file(
    services: Services,
    org: str,
    sup: str,
    table: str,
    path: Path,
    fmt: str,
    args: argparse.Namespace,
) -> int:
    from app.write.bodies import open_source
    from app.write.changes.commit import Target
    from app.write.request import check_name

    for kind, name in (("org", org), ("super", sup), ("table", table)):
        check_name(kind, name)
    current = (await services.reader.super_state(org, sup)).tables.get(table)
    known = {f.name: f.type for f in current.columns} if current else {}
    source = await anyio.to_thread.run_sync(open_source, path, fmt, known)
    target = Target(org, sup, table, actor="cli", request_id=uuid.uuid4().hex)
    outcome = await services.mutator.upsert(target, source, args.key.split(","), args.newer_than)
    r = outcome.result
    rows = r["inserted"] + r["updated"] + r["unchanged"]
    print(json.dumps({"table": table, "version": outcome.version, "rows": rows,
                      "event_id": outcome.event_id, **r}))  # fmt: skip
    return 0


def cmd_gc(settings: Settings, args: argparse.Namespace) -> int:
    from app.ops.gc import GcRefused, collect_garbage, parse_duration

    try:
        grace = parse_duration(args.grace) if args.grace else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            try:
                report = await collect_garbage(
                    services.log,
                    services.reader,
                    services.storage,
                    grace=grace or timedelta(seconds=settings.gc_grace_s),
                    dry_run=args.dry_run,
                )
            except GcRefused as exc:
                print(f"refused: {exc}", file=sys.stderr)
                return 2
            verb = "would delete" if args.dry_run else "deleted"
            for obj in report.orphans:
                print(f"{verb} {obj.key} ({obj.size} bytes, {obj.modified.isoformat()})")
            print(
                f"scanned {report.scanned} data files: {report.referenced} referenced, "
                f"{report.young} unreferenced but within the grace period, "
                f"{len(report.orphans)} orphans ({report.orphan_bytes} bytes) {verb}"
            )
            return 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    from app.write.changes.commit import Target

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            tables = await services.tables(args.target or "")
            if args.target and not tables:
                raise SystemExit(f"no table matches {args.target!r}")
            for org, sup, table in tables:
                target = Target(org, sup, table, actor="cli", request_id=uuid.uuid4().hex)
                outcome = await services.mutator.compact(target)
                if outcome.event_id is not None:
                    r = outcome.result
                    print(
                        f"{org}/{sup}/{table}: merged {r['files_removed']} files and inlined "
                        f"batches into {r['files_added']} ({r['rows']} rows), version "
                        f"{outcome.version}"
                    )
            return 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


def cmd_expire(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from app.ops.gc import parse_duration
    from app.write.changes.commit import Target

    try:
        cutoff = datetime.now(UTC) - parse_duration(args.older_than)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def main(url: str) -> int:
        async with Services.open(settings, url) as services:
            tables = await services.tables(args.target or "")
            if args.target and not tables:
                raise SystemExit(f"no table matches {args.target!r}")
            for org, sup, table in tables:
                target = Target(org, sup, table, actor="cli", request_id=uuid.uuid4().hex)
                outcome = await services.mutator.expire(target, cutoff)
                if outcome.event_id is not None:
                    print(
                        f"{org}/{sup}/{table}: versions before "
                        f"{outcome.result['retained_from']} expired (now at version "
                        f"{outcome.version})"
                    )
            print("run `ledgerlake gc` to delete the files only expired versions used")
            return 0

    with redis_for(settings) as url:
        return anyio.run(main, url)


# -- parsing --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledgerlake", description="Event-sourced data catalog and warehouse."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--data-dir", type=Path, help="data directory (LEDGERLAKE_DATA_DIR)")
        p.set_defaults(fn=fn)
        return p

    p = command("serve", cmd_serve, "Run the HTTP API and the projector.")
    p.add_argument("--host", help="bind address (LEDGERLAKE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (LEDGERLAKE_PORT, default 8000)")
    p = command("worker", cmd_worker, "Run projections only (scale-out).")
    p.add_argument("--burst", action="store_true", help="catch up once, then exit")
    p = command("replay", cmd_replay, "Rebuild every projection from the event log.")
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare a rebuild with the stored snapshots; exit 1 on a difference",
    )
    p.add_argument(
        "--mirrors",
        action="store_true",
        help="also forget what the mirrors reflect, so the runners publish every table again",
    )
    command("recover", cmd_recover, "Rebuild a lost Redis from the event archive.")
    p = command(
        "rebuild-from-storage",
        cmd_rebuild_from_storage,
        "LOSSY last resort: each table's latest rows from the data files and mirrors.",
    )
    p.add_argument(
        "--ignore-archive",
        action="store_true",
        help="rebuild even though an event archive exists (recover would keep the history)",
    )
    p = command("export", cmd_export, "Write an org or a super (history and files) to a dir.")
    p.add_argument("target", help="org or org/super")
    p.add_argument("--out", required=True, help="a new directory")
    p = command("import", cmd_import, "Add an export to this deployment.")
    p.add_argument("source", help="the export's directory")
    p = command("query", cmd_query, "Run a read-only SQL query.")
    p.add_argument("sql")
    p.add_argument("--super", required=True, help="org/super whose tables the SQL names")
    p.add_argument("--limit", type=int)
    p.add_argument("--timeout", type=float, help="seconds")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--as-of-version", type=int, help="query that version of the one table")
    p.add_argument("--as-of-time", help="query every table as of this ISO 8601 instant")
    _api_options(p)
    p = command("ingest", cmd_ingest, "Load a file into a table.")
    p.add_argument("file")
    p.add_argument("--table", required=True, help="org/super/table")
    p.add_argument("--mode", choices=["append", "overwrite", "upsert"], default="append")
    p.add_argument("--key", help="upsert: key columns, comma-separated")
    p.add_argument("--newer-than", help="upsert: apply a row only if this column is greater")
    p.add_argument("--format", choices=["json", "ndjson", "csv", "parquet", "arrow"])
    _api_options(p)
    p = command("mcp", cmd_mcp, "Serve the MCP tools (stdio, or HTTP) over a running Ledgerlake.")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument(
        "--url", help="the Ledgerlake API (LEDGERLAKE_URL, default http://127.0.0.1:8000)"
    )
    p.add_argument("--token", help="stdio: the API token or JWT to use (LEDGERLAKE_TOKEN)")
    p.add_argument("--host", help="http: bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="http: port (default 8765)")
    p = command("compact", cmd_compact, "Merge small files and inlined rows of tables.")
    p.add_argument("target", nargs="?", help="org, org/super or org/super/table (default: all)")
    p = command("expire", cmd_expire, "Expire old table versions (time travel and restore).")
    p.add_argument(
        "--older-than", required=True, help="e.g. 7d: versions replaced before then expire"
    )
    p.add_argument("target", nargs="?", help="org, org/super or org/super/table (default: all)")
    p = command("gc", cmd_gc, "Delete orphan data files older than the grace period.")
    p.add_argument("--grace", help="e.g. 3600, 30m, 2h, 7d (LEDGERLAKE_GC_GRACE_S)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    return parser


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that every ``finally`` (stopping the
    embedded Redis among them) runs, as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # uvicorn captures SIGTERM during serve and re-raises it after a graceful shutdown;
    # with this handler that re-raise becomes an exception instead of an abrupt exit.
    signal.signal(signal.SIGTERM, _raise_terminated)
    args = build_parser().parse_args(argv)
    overrides = {
        "data_dir": args.data_dir,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    settings = Settings.from_env(**overrides)
    setup_logging(settings.log_format, settings.log_level)
    try:
        code: int = args.fn(settings, args)
    except LedgerError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
