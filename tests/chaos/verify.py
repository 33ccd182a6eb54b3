"""The checks after a chaos run, once every part is back and the projections, mirrors
and archive have caught up: the rows against the ledger (lost, duplicated, partial,
wrong or phantom), ``ledgerlake replay --verify``, a census of the storage (every object
is referenced, mirror- or archive-owned, or an orphan gc collects once its grace has
passed: nothing gc would leave forever) and both mirrors read back by their own
libraries after that gc."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
from deltalake import DeltaTable
from pyiceberg.table import StaticTable

from app.ops.gc import DATA_FILE, MIRROR_COPY, collect_garbage, referenced_files
from app.services import Services
from app.settings import Settings
from mirrors.plan import copy_name
from tests.chaos.clients import APPENDS, KEYED, Session, table_path
from tests.chaos.ledger import Ledger
from tests.support.chaos import ChaosCluster
from tests.support.processes import Procs

SETTLE_TIMEOUT_S = 120.0
SAMPLE = 5  # ids shown per finding


@dataclass
class Census:
    """The storage's objects by what owns them (counts), and those nothing owns."""

    kinds: Counter[str] = field(default_factory=Counter)
    orphans: list[str] = field(default_factory=list)  # gc deletes these after the grace
    unowned: list[str] = field(default_factory=list)  # nothing ever deletes these


def settle(cluster: ChaosCluster) -> str | None:
    """Poll until every projection (catalog, mirrors, archive) has applied every event
    and both mirrors of both tables reflect their latest version; a problem otherwise."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = "no answer"
    with httpx.Client(timeout=10.0, headers=cluster.headers()) as http:
        while time.monotonic() < deadline:
            try:
                health = http.get(f"{cluster.url()}/health").json()
                lags = {name: (p["lag_events"], p.get("failed_tables", 0))
                        for name, p in health.get("projections", {}).items()}  # fmt: skip
                behind = {
                    f"{table}/{m['format']}": m["lag_versions"]
                    for table in (APPENDS, KEYED)
                    for m in http.get(cluster.url() + table_path(table)).json()["mirrors"]
                }
            except (httpx.TransportError, ValueError, KeyError) as exc:
                last = repr(exc)
            else:
                last = f"health {health.get('status')}, lags {lags}, mirrors behind {behind}"
                idle = all(lag == (0, 0) for lag in lags.values())
                if health.get("status") == "ok" and idle and not any(behind.values()):
                    return None
            cluster.wait_change(cluster.generation, 0.2)  # polling the projections
    return f"did not settle within {SETTLE_TIMEOUT_S:g}s: {last}"


def query_all(session: Session, sql: str) -> list[list[Any]]:
    """A query that must succeed now that everything is up (a few tries for a blip)."""
    for _ in range(5):
        rows = session.query(sql)
        if rows is not None:
            return rows
        session.cluster.wait_change(session.cluster.generation, 0.5)
    raise AssertionError(f"{sql!r} kept failing after the run")


def sample(values: list[Any]) -> str:
    shown = ", ".join(map(str, sorted(values)[:SAMPLE]))
    return f"{len(values)} ({shown}{', ...' if len(values) > SAMPLE else ''})"


def check_rows(session: Session, ledger: Ledger) -> dict[str, str]:
    """Findings about the rows, by name (empty: all is well); also sets the ledger's
    lost and duplicate counts for the figures."""
    findings: dict[str, str] = {}
    counts = Counter(row[0] for row in query_all(session, f"select id from {APPENDS}"))
    duplicates = [i for i, n in counts.items() if n > 1]
    lost = [i for b in ledger.batches for i in b.ids if i not in counts]
    partial = [b.key for b in ledger.unsure if 0 < sum(i in counts for i in b.ids) < len(b.ids)]
    known = {i for b in (*ledger.batches, *ledger.unsure) for i in b.ids}
    phantom = [i for i in counts if i not in known]
    stored = query_all(session, f"select k, v from {KEYED}")
    by_key = Counter(k for k, _ in stored)
    values = dict(stored)
    key_duplicates = [k for k, n in by_key.items() if n > 1]
    wrong = [k for k, s in ledger.keys.items() if values.get(k) not in s.allowed]
    key_phantom = [k for k in values if k not in ledger.keys]
    ledger.lost = len(lost) + len(wrong)
    ledger.duplicates = len(duplicates) + sum(by_key[k] - 1 for k in key_duplicates)
    for name, found in [("acknowledged ids missing", lost), ("duplicate ids", duplicates),
                        ("batches partly present", partial), ("ids never written", phantom),
                        ("duplicate keys", key_duplicates), ("keys not as acknowledged", wrong),
                        ("keys never written", key_phantom)]:  # fmt: skip
        if found:
            findings[name] = sample(found)
    for k in wrong[:SAMPLE]:
        findings[f"key {k}"] = f"holds {values.get(k)}, acknowledged {ledger.keys[k].allowed}"
    return findings


def replay_verify(procs: Procs, cluster: ChaosCluster) -> str | None:
    done = procs.cli("replay", "--verify", "--data-dir", cluster.data_dir, env=cluster.env)
    if done.returncode != 0 or " 0 difference(s)" not in done.stdout:
        return f"exit {done.returncode}: {done.stdout.strip()} {done.stderr.strip()[-2000:]}"
    return None


def settings_of(cluster: ChaosCluster) -> Settings:
    return Settings.from_env({**cluster.env, "LEDGERLAKE_DATA_DIR": str(cluster.data_dir)})


def census(cluster: ChaosCluster) -> tuple[Census, Census]:
    """The storage before and after a gc run as if its grace period had passed."""

    async def main() -> tuple[Census, Census]:
        settings = settings_of(cluster)
        grace = timedelta(seconds=settings.gc_grace_s)
        async with Services.open(settings) as services:
            before = await _census(services, grace)
            later = datetime.now(UTC) + 2 * grace
            await collect_garbage(services.log, services.reader, services.storage,
                                  grace=grace, dry_run=False, now=later)  # fmt: skip
            return before, await _census(services, grace)

    return anyio.run(main)


async def _census(services: Services, grace: timedelta) -> Census:
    registry = await services.reader.registry()
    known = sorted((org.name, sup) for org in registry.orgs.values() for sup in org.supers)
    objects = [o async for o in services.storage.list_objects()]
    live = await referenced_files(services.log, services.reader, known, with_states=True)
    names = {copy_name(key) for key in live}
    report = await collect_garbage(services.log, services.reader, services.storage, grace=grace,
                                   dry_run=True, now=datetime.now(UTC) + 2 * grace)  # fmt: skip
    collectable = {o.key for o in report.orphans}
    out = Census()
    for obj in objects:
        key = obj.key
        copy = MIRROR_COPY.match(key)
        if key.startswith(".archive/"):
            kind = "archive"
        elif "/_delta_log/" in key or "/metadata/" in key:
            kind = "mirror metadata"
        elif key in live:
            kind = "data file"
        elif copy is not None and copy["name"] in names:
            kind = "mirror copy"
        elif key in collectable:
            kind = "orphan"
            out.orphans.append(key)
        else:
            kind = "unowned"
            out.unowned.append(key)
        out.kinds[kind] += 1
    assert all(DATA_FILE.match(k) or MIRROR_COPY.match(k) for k in out.orphans)
    return out


def check_mirrors(cluster: ChaosCluster, session: Session) -> dict[str, str]:
    """Each table's Delta and Iceberg mirror, read by deltalake and pyiceberg, holds the
    rows a query returns (after gc: no file a mirror needs was deleted)."""
    s = settings_of(cluster)
    delta = {"aws_endpoint_url": str(s.s3_endpoint_url), "aws_region": "us-east-1",
             "aws_access_key_id": str(s.s3_access_key_id), "aws_allow_http": "true",
             "aws_secret_access_key": str(s.s3_secret_access_key)}  # fmt: skip
    iceberg = {"s3.endpoint": str(s.s3_endpoint_url), "s3.region": "us-east-1",
               "s3.access-key-id": str(s.s3_access_key_id),
               "s3.secret-access-key": str(s.s3_secret_access_key),
               "s3.force-virtual-addressing": "false"}  # fmt: skip
    findings: dict[str, str] = {}
    for table, column in ((APPENDS, "id"), (KEYED, "k")):
        expected = Counter(r[0] for r in query_all(session, f"select {column} from {table}"))
        detail = session.http.get(session.cluster.url() + table_path(table)).json()
        for m in detail["mirrors"]:
            try:
                if m["format"] == "delta":
                    arrow = DeltaTable(m["location"], storage_options=delta).to_pyarrow_table()
                else:
                    meta = StaticTable.from_metadata(m["metadata_location"], properties=iceberg)
                    arrow = meta.scan().to_arrow()
                got = Counter(arrow.column(column).to_pylist())
            except Exception as exc:
                findings[f"{table} {m['format']} mirror"] = f"unreadable: {exc!r}"[:500]
                continue
            if got != expected:
                missing, extra = expected - got, got - expected
                findings[f"{table} {m['format']} mirror"] = (
                    f"missing {sample(list(missing))}, extra {sample(list(extra))}"
                )
    return findings
