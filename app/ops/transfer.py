"""``ledgerlake export`` and ``import``: move an org or a super, with its whole history
and its data files, from one deployment to another.

An export is a directory::

    manifest.json                       what it holds: org, supers, tables, counts, checksums
    supers/<super>/events.ndjson.gz     the super's whole log (archived part included), as
                                        the archive stores it: every entry with its id
    files/<key>                         every data file a retained version references

Import refuses (changing nothing) when a super of the export already exists in the
target, when a file is missing or a checksum does not match. Then it copies the files
to the same keys (keys name the org and super, so nothing else can own them), adds the
events under their original ids (a new stream may take any ids), derives the table
versions as ``recover`` does and registers the super: the projections and mirror
runners pick it up like any new super, and the archiver archives it. Principals,
grants, roles and tokens are not moved (they belong to the deployment's auth): grant
access in the target. Mirrors are published anew by the target's runners."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec

from app.ops.gc import referenced_files
from app.ops.recover import add_entries, track_version
from app.services import Services
from events.archive import Entry, SegmentInfo, decode_segment, encode_segment
from events.errors import InvalidInput, NotFound
from events.model import encode_event, now
from events.redis_log import guarded
from mirrors.access import access_for

FORMAT = "ledgerlake-export/1"


class ExportedSuper(msgspec.Struct, frozen=True):
    name: str
    events: int
    first: str
    last: str
    size: int
    sha256: str
    files: tuple[str, ...]

    @property
    def segment(self) -> SegmentInfo:
        """What its events file must hold (checked as an archive segment is)."""
        return SegmentInfo(0, f"supers/{self.name}/events.ndjson.gz", self.first, self.last,
                           self.events, self.size, self.sha256)  # fmt: skip


class ExportManifest(msgspec.Struct, frozen=True):
    format: str
    org: str
    created_at: datetime
    supers: tuple[ExportedSuper, ...]
    file_sha256: dict[str, str] = {}


@dataclass
class TransferReport:
    supers: list[str] = field(default_factory=list)
    events: int = 0
    files: int = 0
    bytes: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def _whole_log(services: Services, org: str, name: str) -> list[Entry]:
    """Every entry of a super's log, the archived part (read from the archive) too."""
    entries: list[Entry] = []
    after = "0-0"
    while True:
        page = await services.log.read(org, name, after=after, count=5000)
        entries += [(e.id, {k: v.decode() for k, v in encode_event(e).items()}) for e in page]
        if len(page) < 5000:
            return entries
        after = page[-1].id


async def _copy_files(
    fs: Any,
    root: str,
    keys: list[str],
    out: Path,
    report: TransferReport,
    checksums: dict[str, str],
    progress: Callable[[int], None] | None,
) -> None:
    """Copy the data files ``keys`` under ``out/files/``, with their checksums."""
    for key in keys:
        dest = out / "files" / key
        await anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True)

        def copy(key: str = key, dest: Path = dest) -> int:
            with fs.open_input_stream(root + key) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return dest.stat().st_size

        report.bytes += await anyio.to_thread.run_sync(copy)
        checksums[key] = await anyio.to_thread.run_sync(_sha256, dest)
        report.files += 1
        if progress is not None:
            progress(report.files)


async def export_data(
    services: Services,
    org: str,
    sup: str | None,
    out: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> TransferReport:
    """Write the org (every super) or one super to the directory ``out`` (which must
    not exist yet)."""
    registry = await services.reader.registry()
    info = registry.orgs.get(org)
    if info is None:
        raise NotFound(f"org {org!r} does not exist", code="org_not_found")
    names = sorted(info.supers) if sup is None else [sup]
    if sup is not None and sup not in info.supers:
        raise NotFound(f"super {org}/{sup} does not exist", code="super_not_found")
    if await anyio.Path(out).exists():
        raise InvalidInput(f"{out} already exists: export into a new directory", code="exists")
    await anyio.Path(out).mkdir(parents=True)
    access = access_for(services.storage)
    fs, root = access.filesystem()
    report = TransferReport()
    exported = []
    checksums: dict[str, str] = {}
    for name in names:
        entries = await _whole_log(services, org, name)
        data = encode_segment(entries)
        target = out / "supers" / name / "events.ndjson.gz"
        await anyio.Path(target.parent).mkdir(parents=True)
        await anyio.Path(target).write_bytes(data)
        keys = sorted(
            k for k in await referenced_files(services.log, services.reader, [(org, name)])
            if not k.startswith("inline/")
        )  # fmt: skip
        await _copy_files(fs, root, keys, out, report, checksums, progress)
        exported.append(
            ExportedSuper(
                name=name,
                events=len(entries),
                first=entries[0][0] if entries else "0-0",
                last=entries[-1][0] if entries else "0-0",
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                files=tuple(keys),
            )
        )
        report.supers.append(f"{org}/{name}")
        report.events += len(entries)
    manifest = ExportManifest(FORMAT, org, now(), tuple(exported), checksums)
    encoded = msgspec.json.format(msgspec.json.encode(manifest))
    await anyio.Path(out / "manifest.json").write_bytes(encoded)
    return report


def read_manifest(src: Path) -> ExportManifest:
    try:
        manifest = msgspec.json.decode((src / "manifest.json").read_bytes(), type=ExportManifest)
    except (OSError, msgspec.DecodeError) as exc:
        raise InvalidInput(f"{src} is not a Ledgerlake export: {exc}", code="bad_export") from exc
    if manifest.format != FORMAT:
        raise InvalidInput(f"unknown export format {manifest.format!r}", code="bad_export")
    return manifest


async def import_data(
    services: Services, src: Path, *, progress: Callable[[int], None] | None = None
) -> TransferReport:
    """Add the export in ``src`` to this deployment (see the module docstring)."""
    manifest = read_manifest(src)
    org = manifest.org
    registry = await services.reader.registry()
    existing = registry.orgs.get(org)
    taken = [s.name for s in manifest.supers if existing and s.name in existing.supers]
    if taken:
        raise InvalidInput(
            f"{', '.join(f'{org}/{n}' for n in taken)} already exist(s) in this deployment: "
            "an import never merges into or replaces a super (drop it, or import elsewhere)",
            code="super_exists",
        )
    # Everything is checked before anything is written.
    logs: dict[str, list[Entry]] = {}
    for s in manifest.supers:
        path = src / "supers" / s.name / "events.ndjson.gz"
        data = await anyio.Path(path).read_bytes() if await anyio.Path(path).is_file() else b""
        logs[s.name] = decode_segment(data, s.segment) if s.events else []
        for key in s.files:
            file = src / "files" / key
            if not await anyio.Path(file).is_file():
                raise InvalidInput(f"the export lacks the data file {key}", code="bad_export")
            if await anyio.to_thread.run_sync(_sha256, file) != manifest.file_sha256.get(key):
                raise InvalidInput(f"the data file {key} is damaged", code="bad_export")
    report = TransferReport()
    for s in manifest.supers:
        for key in s.files:
            staged = services.storage.staging_file(".parquet")
            await anyio.to_thread.run_sync(shutil.copyfile, src / "files" / key, staged)
            try:
                report.bytes += await services.storage.publish(staged, key)
            finally:
                staged.unlink(missing_ok=True)
            report.files += 1
            if progress is not None:
                progress(report.files)
        entries = logs[s.name]
        versions: dict[str, str] = {}
        for entry in entries:
            track_version(versions, entry)
        stream = services.keys.stream(org, s.name)
        entries = await _not_yet_added(services, stream, entries)
        for start in range(0, len(entries), 1000):
            report.events += await add_entries(services, stream, entries[start : start + 1000])
        if versions:
            mapping: dict[Any, Any] = dict(versions)
            await guarded(services.redis.hset(services.keys.versions(org, s.name), mapping=mapping))
        # Registered last: the projections start on the super once its log is whole.
        await services.writer.register(org, s.name, "import", f"import-{uuid.uuid4().hex}")
        report.supers.append(f"{org}/{s.name}")
    return report


async def _not_yet_added(services: Services, stream: str, entries: list[Entry]) -> list[Entry]:
    """The entries an earlier attempt of this import did not add (an import that failed
    half way is resumed by running it again): the stream of an unregistered super may
    hold only a prefix of the export's log."""
    last: Any = await guarded(services.redis.xrevrange(stream, count=1))
    if not last:
        return entries
    last_id = last[0][0].decode() if isinstance(last[0][0], bytes) else last[0][0]
    ids = [e[0] for e in entries]
    if last_id not in ids:
        raise InvalidInput(
            f"{stream} holds events that are not the export's: not a half-done import of "
            "it (delete that stream, or import elsewhere)",
            code="super_exists",
        )
    return entries[ids.index(last_id) + 1 :]
