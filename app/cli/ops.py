"""The operations commands: ``replay`` (rebuild or verify the projections), ``recover``
(a lost Redis from the archive), the lossy ``rebuild-from-storage``, ``export`` and
``import``, and ``gc``."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from app.cli.common import Progress, with_services
from app.services import Services
from app.settings import Settings


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from projections.replay import replay

    async def main(services: Services) -> int:
        progress = Progress("replayed", "events")
        report = await replay(services.log, services.store, verify=args.verify, progress=progress)
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

    return with_services(settings, main)


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

    return with_services(settings, main)


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

    return with_services(settings, main)


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

    return with_services(settings, main)


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

    return with_services(settings, main)


def cmd_gc(settings: Settings, args: argparse.Namespace) -> int:
    from app.ops.gc import GcRefused, collect_garbage, parse_duration

    try:
        grace = parse_duration(args.grace) if args.grace else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    async def main(services: Services) -> int:
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

    return with_services(settings, main)
