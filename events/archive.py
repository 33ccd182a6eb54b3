"""The event archive: every stream's entries, in order, as immutable checksummed segments
in the object storage, so that the log outlives Redis.

Layout, under the storage root (a name no org can take, since org names start with a
letter or ``_``)::

    .archive/<stream>/manifests/<n>-<rand>.json  the segments, in order: the commit point
    .archive/<stream>/chapter-<n>-<rand>.json  a sealed run of 1,000 segments
    .archive/<stream>/<seq:012d>-<rand>.ndjson.gz   one segment: gzip of a JSON line per entry

``<stream>`` is ``registry``, ``auth``, ``audit`` (the query records) or
``supers/<org>/<super>``. A line is
``{"id": "<stream id>", "f": {"<field>": "<value>", ...}}``: the stream entry exactly as
Redis holds it (every field of every stream is UTF-8 text), so recovery can add it back
under the same id. The manifest lists each segment's sequence number, first and last id,
entry count, size and SHA-256; a segment is written first and only counts once a
manifest names it, so the archived position (the last id of the last segment) and the
segment are one commit. Manifests are versions, never overwritten (``<n>`` is the
number of segments they commit): a writer that lost its lease can add one more version,
never replace the one the new writer committed (see ``Archive.manifest``). Segment
names are unique too: a segment written by a run that crashed before its manifest (or
lost its lease) is an unreferenced file, never one that a manifest names and another
writer changed."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import msgspec

from events.errors import Unavailable
from events.model import Event, decode_event, stream_id_tuple
from events.storage.port import Storage

ROOT = ".archive"
REGISTRY = "registry"
AUTH = "auth"
AUDIT = "audit"  # the query audit records
CACHED_SEGMENTS = 8
CHAPTER_SEGMENTS = 1000


def super_stream(org: str, super_: str) -> str:
    """The archive name of a super's stream."""
    return f"supers/{org}/{super_}"


class SegmentInfo(msgspec.Struct, frozen=True):
    seq: int
    key: str
    first: str
    last: str
    count: int
    size: int
    sha256: str


class ChapterInfo(msgspec.Struct, frozen=True):
    """A sealed run of ``CHAPTER_SEGMENTS`` segments, listed in a file of its own."""

    seq: int
    key: str
    first: str
    last: str
    count: int
    segments: int
    sha256: str


class Chapter(msgspec.Struct, frozen=True):
    stream: str
    seq: int
    segments: tuple[SegmentInfo, ...]


class Manifest(msgspec.Struct, frozen=True):
    """A stream's archive: the sealed chapters, then the open chapter's segments. The
    manifest stays small however long the stream grows (a chapter per
    ``CHAPTER_SEGMENTS`` segments)."""

    stream: str
    segments: tuple[SegmentInfo, ...] = ()
    chapters: tuple[ChapterInfo, ...] = ()

    @property
    def position(self) -> str:
        """The id of the last archived entry (``0-0`` when none is)."""
        if self.segments:
            return self.segments[-1].last
        return self.chapters[-1].last if self.chapters else "0-0"

    @property
    def count(self) -> int:
        return sum(c.count for c in self.chapters) + sum(s.count for s in self.segments)

    @property
    def next_seq(self) -> int:
        return sum(c.segments for c in self.chapters) + len(self.segments)


Entry = tuple[str, dict[str, str]]
"""A stream entry: its id and its fields."""


class ArchiveCorrupt(Unavailable):
    """A segment does not match its manifest (checksum, order or size)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="archive_corrupt")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def event_of(entry: Entry) -> Event:
    """The event an archived entry holds."""
    entry_id, fields = entry
    return decode_event(entry_id, {k: v.encode() for k, v in fields.items()})


def entry_of(entry_id: bytes | str, fields: Mapping[Any, Any]) -> Entry:
    """A Redis stream entry (as redis-py returns it) as an archive entry."""
    return _text(entry_id), {_text(k): _text(v) for k, v in fields.items()}


def encode_segment(entries: list[Entry]) -> bytes:
    """The segment file: gzip (no timestamp: the same entries give the same bytes) of
    one compact JSON line per entry."""
    lines = "".join(
        json.dumps({"id": i, "f": f}, separators=(",", ":"), ensure_ascii=False) + "\n"
        for i, f in entries
    )
    return gzip.compress(lines.encode(), compresslevel=6, mtime=0)


def decode_segment(data: bytes, info: SegmentInfo) -> list[Entry]:
    """The entries of a segment, checked against its manifest entry."""
    if hashlib.sha256(data).hexdigest() != info.sha256 or len(data) != info.size:
        raise ArchiveCorrupt(f"archive segment {info.key} does not match its checksum")
    out: list[Entry] = []
    for line in gzip.decompress(data).decode().splitlines():
        record = json.loads(line)
        out.append((record["id"], record["f"]))
    ids = [stream_id_tuple(i) for i, _ in out]
    if (
        len(out) != info.count
        or not out
        or out[0][0] != info.first
        or out[-1][0] != info.last
        or any(a >= b for a, b in itertools.pairwise(ids))
    ):
        raise ArchiveCorrupt(f"archive segment {info.key} does not hold what its manifest says")
    return out


class Archive:
    """Reads and appends the archive of each stream in a ``Storage``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._cache: OrderedDict[str, list[Entry]] = OrderedDict()

    @staticmethod
    def manifest_dir(stream: str) -> str:
        return f"{ROOT}/{stream}/manifests/"

    async def manifest(self, stream: str) -> Manifest:
        """The stream's current manifest: of the versions in ``manifests/`` (each written
        once, never replaced), the one with the most segments; between two with as many
        (a writer that lost its lease racing the one that took it), the one that
        reaches further. Either way it covers everything any writer trimmed."""
        versions: dict[int, list[str]] = {}
        async for obj in self.storage.list_objects(self.manifest_dir(stream)):
            name = obj.key.rsplit("/", 1)[-1]
            head = name.split("-", 1)[0]
            if name.endswith(".json") and head.isdigit():
                versions.setdefault(int(head), []).append(obj.key)
        if not versions:
            return Manifest(stream)
        best: Manifest | None = None
        for key in versions[max(versions)]:
            data = await self.storage.read(key)
            if data is None:
                continue  # deleted meanwhile (an older version being cleaned up)
            found = msgspec.json.decode(data, type=Manifest)
            if best is None or stream_id_tuple(found.position) > stream_id_tuple(best.position):
                best = found
        if best is None:
            raise ArchiveCorrupt(f"the manifest of {stream} vanished while it was read")
        return best

    async def streams(self) -> list[str]:
        """Every archived stream's name."""
        names = set()
        async for obj in self.storage.list_objects(ROOT + "/"):
            stream, sep, _ = obj.key[len(ROOT) + 1 :].rpartition("/manifests/")
            if sep:
                names.add(stream)
        return sorted(names)

    async def append(self, manifest: Manifest, entries: list[Entry]) -> Manifest:
        """Write ``entries`` (all after ``manifest.position``, in order) as the next
        segment, then the manifest that commits it. Returns the new manifest."""
        if not entries:
            return manifest
        if stream_id_tuple(entries[0][0]) <= stream_id_tuple(manifest.position):
            raise ValueError(f"entry {entries[0][0]} is not after {manifest.position}")
        seq = manifest.next_seq
        key = f"{ROOT}/{manifest.stream}/{seq:012d}-{uuid.uuid4().hex[:8]}.ndjson.gz"
        data = encode_segment(entries)
        info = SegmentInfo(
            seq=seq,
            key=key,
            first=entries[0][0],
            last=entries[-1][0],
            count=len(entries),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        await self._put(key, data)
        segments, chapters = (*manifest.segments, info), manifest.chapters
        if len(segments) >= CHAPTER_SEGMENTS:
            chapters = (*chapters, await self._seal(manifest.stream, len(chapters), segments))
            segments = ()
        updated = Manifest(manifest.stream, segments, chapters)
        folder = self.manifest_dir(manifest.stream)
        await self._put(f"{folder}{seq + 1:012d}-{uuid.uuid4().hex[:8]}.json",
                        msgspec.json.encode(updated))  # fmt: skip
        # Versions two behind are no one's current manifest any more.
        async for obj in self.storage.list_objects(folder):
            head = obj.key.rsplit("/", 1)[-1].split("-", 1)[0]
            if head.isdigit() and int(head) < seq:
                await self.storage.delete(obj.key)
        return updated

    async def _seal(self, stream: str, seq: int, segments: tuple[SegmentInfo, ...]) -> ChapterInfo:
        """Write a chapter file (immutable, uniquely named) for ``segments``."""
        data = msgspec.json.encode(Chapter(stream, seq, segments))
        key = f"{ROOT}/{stream}/chapter-{seq:08d}-{uuid.uuid4().hex[:8]}.json"
        await self._put(key, data)
        return ChapterInfo(
            seq=seq,
            key=key,
            first=segments[0].first,
            last=segments[-1].last,
            count=sum(s.count for s in segments),
            segments=len(segments),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    async def segments(self, manifest: Manifest, after: str) -> AsyncIterator[SegmentInfo]:
        """The segments holding entries after ``after`` (from it, for an inclusive
        start: a segment ending exactly there is included), in order."""
        start = stream_id_tuple(after)
        for chapter in manifest.chapters:
            if stream_id_tuple(chapter.last) < start:
                continue
            data = await self.storage.read(chapter.key)
            if data is None or hashlib.sha256(data).hexdigest() != chapter.sha256:
                raise ArchiveCorrupt(f"archive chapter {chapter.key} is missing or damaged")
            for info in msgspec.json.decode(data, type=Chapter).segments:
                if stream_id_tuple(info.last) >= start:
                    yield info
        for info in manifest.segments:
            if stream_id_tuple(info.last) >= start:
                yield info

    async def entries(
        self, stream: str, after: str = "0-0", *, inclusive: bool = False
    ) -> AsyncIterator[Entry]:
        """The archived entries of ``stream`` after ``after`` (or from it, with
        ``inclusive``), in order, each segment checked against the manifest."""
        manifest = await self.manifest(stream)
        start = stream_id_tuple(after)
        async for info in self.segments(manifest, after):
            for entry in await self._segment(info):
                at = stream_id_tuple(entry[0])
                if at > start or (inclusive and at == start):
                    yield entry

    async def _segment(self, info: SegmentInfo) -> list[Entry]:
        """A segment's entries (the last few read are kept: segments never change)."""
        cached = self._cache.get(info.sha256)
        if cached is not None:
            self._cache.move_to_end(info.sha256)
            return cached
        data = await self.storage.read(info.key)
        if data is None:
            raise ArchiveCorrupt(f"archive segment {info.key} is missing")
        entries = decode_segment(data, info)
        self._cache[info.sha256] = entries
        while len(self._cache) > CACHED_SEGMENTS:
            self._cache.popitem(last=False)
        return entries

    async def _put(self, key: str, data: bytes) -> None:
        staged = self.storage.staging_file(".archive")
        await anyio.to_thread.run_sync(staged.write_bytes, data)
        try:
            await self.storage.publish(staged, key)
        finally:
            staged.unlink(missing_ok=True)
