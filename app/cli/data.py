"""The data commands: ``query``, ``ingest`` (append, overwrite or upsert a file),
``compact`` and ``expire``; query and ingest can also go through a running Ledgerlake
(``--api``)."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import anyio

from app.cli.common import Progress, api_call, print_table, split, with_services
from app.services import Services
from app.settings import Settings
from app.write.changes.commit import Target


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    org, sup = split(args.super, 2, "--super")
    if args.api:
        import pyarrow as pa

        body = {"sql": args.sql, "limit": args.limit, "timeout_s": args.timeout,
                "as_of_version": args.as_of_version, "as_of_time": args.as_of_time}  # fmt: skip
        response = api_call(
            args,
            "POST",
            f"/v1/{org}/{sup}/query",
            json={k: v for k, v in body.items() if v is not None},
            headers={"Accept": "application/vnd.apache.arrow.stream"},
        )
        print_table(pa.ipc.open_stream(response.content).read_all(), args.format)
        if response.headers.get("x-ledgerlake-truncated") == "true":
            print("(truncated)", file=sys.stderr)
        return 0

    async def main(services: Services) -> int:
        state = await services.reader.require_super(org, sup)
        views = services.views(
            org, sup, state, as_of_version=args.as_of_version, as_of_time=args.as_of_time
        )
        result = await services.engine.run(
            views, args.sql, limit=args.limit, timeout_s=args.timeout
        )
        print_table(result.table, args.format)
        if result.truncated:
            print(f"(truncated at {result.table.num_rows} rows)", file=sys.stderr)
        return 0

    return with_services(settings, main)


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from app.write.bodies import format_for_path
    from app.write.request import IngestRequest

    org, sup, table = split(args.table, 3, "--table")
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
        return _ingest_by_api(args, f"/v1/{org}/{sup}/tables/{table}/rows", path, fmt)

    async def main(services: Services) -> int:
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

    return with_services(settings, main)


def _ingest_by_api(args: argparse.Namespace, rows_path: str, path: Path, fmt: str) -> int:
    from app.write.bodies import CONTENT_TYPES

    media = next(m for m, f in CONTENT_TYPES.items() if f == fmt)
    params = {"mode": args.mode, "key": args.key, "newer_than": args.newer_than}
    response = api_call(
        args,
        "POST",
        rows_path,
        params={k: v for k, v in params.items() if v},
        content=path.read_bytes(),
        headers={"Content-Type": media},
    )
    print(json.dumps(response.json()))
    return 0


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


async def _targets(services: Services, pattern: str | None) -> list[Target]:
    """The tables an org, org/super or org/super/table names (every table without one),
    each as the target of one change; exits if a pattern names none."""
    tables = await services.tables(pattern or "")
    if pattern and not tables:
        raise SystemExit(f"no table matches {pattern!r}")
    return [Target(o, s, t, actor="cli", request_id=uuid.uuid4().hex) for o, s, t in tables]


def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    async def main(services: Services) -> int:
        for target in await _targets(services, args.target):
            org, sup, table = target.org, target.super_, target.table
            outcome = await services.mutator.compact(target)
            if outcome.event_id is not None:
                r = outcome.result
                print(
                    f"{org}/{sup}/{table}: merged {r['files_removed']} files and inlined "
                    f"batches into {r['files_added']} ({r['rows']} rows), version "
                    f"{outcome.version}"
                )
        return 0

    return with_services(settings, main)


def cmd_expire(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from app.ops.gc import parse_duration

    try:
        cutoff = datetime.now(UTC) - parse_duration(args.older_than)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def main(services: Services) -> int:
        for target in await _targets(services, args.target):
            org, sup, table = target.org, target.super_, target.table
            outcome = await services.mutator.expire(target, cutoff)
            if outcome.event_id is not None:
                print(
                    f"{org}/{sup}/{table}: versions before "
                    f"{outcome.result['retained_from']} expired (now at version "
                    f"{outcome.version})"
                )
        print("run `ledgerlake gc` to delete the files only expired versions used")
        return 0

    return with_services(settings, main)
