"""Workload and snapshot helpers shared by the projector and replay end-to-end tests."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from app.services import Services
from app.write.request import IngestRequest, IngestResult
from projections.replay import rebuild_registry, rebuild_super
from projections.store import encode_table


async def write_rows(
    services: Services,
    tmp: Path,
    target: str,
    rows: list[dict[str, Any]],
    *,
    mode: str = "append",
) -> IngestResult:
    """Ingest ``rows`` (as an NDJSON file) into ``org/super/table`` in this process."""
    org, sup, table = target.split("/")
    path = tmp / f"rows-{uuid.uuid4().hex}.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        return await services.writer.ingest(
            IngestRequest(
                org=org,
                super_=sup,
                table=table,
                source=path,
                fmt="ndjson",
                mode=mode,
                actor="e2e",
                request_id=uuid.uuid4().hex,
            )
        )
    finally:
        path.unlink(missing_ok=True)


async def snapshot_matches_log(services: Services, org: str, sup: str) -> list[str]:
    """Differences between the stored snapshot of a super and a fresh fold of its whole
    log (tables compared by their stored encoding, and the checkpoint)."""
    stored = await services.store.load_super(org, sup)
    rebuilt, _ = await rebuild_super(services.log, org, sup)
    problems = []
    if stored.position != rebuilt.position:
        problems.append(f"{org}/{sup}: checkpoint {stored.position} != log {rebuilt.position}")
    for name in sorted(set(stored.tables) | set(rebuilt.tables)):
        a, b = stored.tables.get(name), rebuilt.tables.get(name)
        if a is None or b is None or encode_table(a) != encode_table(b):
            problems.append(f"{org}/{sup}/{name}: stored snapshot differs from the log")
    return problems


async def registry_matches_log(services: Services) -> list[str]:
    stored = await services.store.load_registry()
    rebuilt = await rebuild_registry(services.log)
    if (stored.orgs, stored.position) != (rebuilt.orgs, rebuilt.position):
        return [f"registry: stored {stored.position} != log {rebuilt.position}"]
    return []
