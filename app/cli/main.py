"""The ``ledgerlake`` command line: its arguments, and how a command runs (settings,
logging, the exit code of an error). The commands live by group: ``server`` (serve,
worker, mcp), ``data`` (query, ingest, compact, expire), ``ops`` (replay, recover,
rebuild-from-storage, export, import, gc); what they share is in ``common``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.cli.common import api_options
from app.cli.data import cmd_compact, cmd_expire, cmd_ingest, cmd_query
from app.cli.ops import (
    cmd_export,
    cmd_gc,
    cmd_import,
    cmd_rebuild_from_storage,
    cmd_recover,
    cmd_replay,
)
from app.cli.server import cmd_mcp, cmd_serve, cmd_worker
from app.logs import setup_logging
from app.settings import Settings
from events.errors import LedgerError


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
    p.add_argument(
        "--workers",
        type=int,
        help="server processes on the port (LEDGERLAKE_SERVE_WORKERS, default one per core)",
    )
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
    api_options(p)
    p = command("ingest", cmd_ingest, "Load a file into a table.")
    p.add_argument("file")
    p.add_argument("--table", required=True, help="org/super/table")
    p.add_argument("--mode", choices=["append", "overwrite", "upsert"], default="append")
    p.add_argument("--key", help="upsert: key columns, comma-separated")
    p.add_argument("--newer-than", help="upsert: apply a row only if this column is greater")
    p.add_argument("--format", choices=["json", "ndjson", "csv", "parquet", "arrow"])
    api_options(p)
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
        "serve_workers": getattr(args, "workers", None),
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
