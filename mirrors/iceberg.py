"""The Iceberg mirror: each table's latest version as an Iceberg (v2) table, with pyiceberg.

The table lives at ``<org>/<super>/<table>/`` with its metadata under ``metadata/``. Its
data files are the canonical Parquet files, registered in place (their stats read from
the Parquet footers); columns are matched by name through the table's default name
mapping, since Ledgerlake's files carry no Iceberg field ids.

Each publish is one Iceberg commit (one new metadata file): schema changes, then one
snapshot that deletes the files the table no longer has and adds the new ones. The
snapshot summary and the table properties carry ``ledgerlake.position`` (the stream
id of the event the commit reflects), ``ledgerlake.version`` and
``ledgerlake.incarnation``. The pointer to the current metadata file lives in Redis
(``MirrorStatus.metadata_location``); the REST catalog serves it.

Maintenance, in the same commit: snapshots older than the retention are expired (which
only edits metadata: pyiceberg never deletes data files), and pyiceberg deletes metadata
files beyond the last ``METADATA_KEEP``. Manifests of expired snapshots are deleted by
``prune_manifests``; data files never are.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pyarrow as pa
import pyarrow.fs as pafs
from pyiceberg.catalog import MetastoreCatalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.io import load_file_io
from pyiceberg.io.pyarrow import parquet_file_to_data_file
from pyiceberg.serializers import FromInputFile
from pyiceberg.table import CommitTableResponse, Table, TableProperties
from pyiceberg.table.name_mapping import NameMapping
from pyiceberg.table.update.snapshot import ExpireSnapshots

from mirrors.plan import MirrorFile

POSITION = "ledgerlake.position"
VERSION = "ledgerlake.version"
INCARNATION = "ledgerlake.incarnation"
METADATA_KEEP = 10


class _PointerCatalog(MetastoreCatalog):
    """The smallest catalog pyiceberg commits through: it writes each new metadata
    file and remembers it; the caller stores the pointer (in Redis)."""

    def __init__(self, props: dict[str, str], current: Table | None) -> None:
        super().__init__("ledgerlake", **props)
        self.current = current

    def load_table(self, identifier: Any) -> Table:
        if self.current is None:
            raise NoSuchTableError(str(identifier))
        return self.current

    def commit_table(
        self, table: Table, requirements: tuple[Any, ...], updates: tuple[Any, ...]
    ) -> CommitTableResponse:
        staged = self._update_and_stage_table(self.current, table.name(), requirements, updates)
        self._write_metadata(staged.metadata, staged.io, staged.metadata_location)
        self.current = Table(
            staged.name(),
            metadata=staged.metadata,
            metadata_location=staged.metadata_location,
            io=staged.io,
            catalog=self,
        )
        response: Any = CommitTableResponse
        return cast(
            CommitTableResponse,
            response(metadata=staged.metadata, metadata_location=staged.metadata_location),
        )

    def _unsupported(self, *_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError("the mirror catalog only commits")

    create_table = register_table = drop_table = rename_table = _unsupported
    create_namespace = drop_namespace = list_tables = list_namespaces = _unsupported
    load_namespace_properties = update_namespace_properties = _unsupported
    list_views = drop_view = view_exists = purge_table = _unsupported
    load_view = register_view = _unsupported


def load(
    props: dict[str, str], metadata_location: str, catalog: _PointerCatalog | None = None
) -> Table:
    io = load_file_io(props, metadata_location)
    metadata = FromInputFile.table_metadata(io.new_input(metadata_location))
    return Table(
        ("ledgerlake", "mirror"),
        metadata=metadata,
        metadata_location=metadata_location,
        io=io,
        catalog=catalog or _PointerCatalog(props, None),
    )


def committed(props: dict[str, str], metadata_location: str | None) -> dict[str, str]:
    """The ``ledgerlake.*`` properties of the mirror at ``metadata_location`` ({} if
    there is none, or it cannot be read)."""
    if not metadata_location:
        return {}
    try:
        table = load(props, metadata_location)
    except (FileNotFoundError, OSError, ValueError):
        return {}
    return {k: v for k, v in table.metadata.properties.items() if k.startswith("ledgerlake.")}


class _Published:
    """The data file paths of the snapshots this process published, by metadata
    location (a location names one immutable metadata file), most recent last."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.paths: OrderedDict[str, frozenset[str]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, location: str | None) -> frozenset[str] | None:
        with self.lock:
            return self.paths.get(location) if location else None

    def put(self, location: str, paths: frozenset[str], previous: str | None) -> None:
        """Record ``location``'s files; ``previous`` (the location it replaces) is
        forgotten: only the newest snapshot of a table is ever published again."""
        with self.lock:
            if previous:
                self.paths.pop(previous, None)
            self.paths[location] = paths
            self.paths.move_to_end(location)
            while len(self.paths) > self.size:
                self.paths.popitem(last=False)


_PUBLISHED = _Published(256)


def publish(
    props: dict[str, str],
    identifier: tuple[str, ...],
    location: str,
    metadata_location: str | None,
    schema: pa.Schema,
    files: Sequence[MirrorFile],
    uri: Any,
    *,
    version: int,
    position: str,
    incarnation: str,
    retention_s: float,
) -> str:
    """Make the mirror at ``location`` hold exactly ``files`` under ``schema``; return
    the new metadata location. ``metadata_location``: the current one, None to create
    the table."""
    marks = {POSITION: position, VERSION: str(version), INCARNATION: incarnation}
    catalog = _PointerCatalog(props, None)
    current = None
    if metadata_location:
        current = load(props, metadata_location, catalog)
        if current.metadata.properties.get(INCARNATION) != incarnation:
            current = None  # the table was dropped and created again: start over
    catalog.current = current
    tx = _begin(catalog, identifier, schema, location, current)
    wanted = {uri(f.key): f for f in files}
    # Which files the current snapshot holds: known from our last publish of it when
    # only files were added since (listing them reads every manifest, which grew with
    # each commit: most of a publish's time after a few hundred versions).
    paths = _PUBLISHED.get(metadata_location) if current is not None else frozenset()
    existing: dict[str, Any] = {}
    if current is not None and (paths is None or not paths <= wanted.keys()):
        existing = {task.file.file_path: task.file for task in current.scan().plan_files()}
        paths = frozenset(existing)
    assert paths is not None
    io = load_file_io(props, location)
    _evolve_schema(tx, schema)
    tx.set_properties(
        **{TableProperties.DEFAULT_NAME_MAPPING: _name_mapping(tx).model_dump_json(), **marks}
    )
    removed = [df for path, df in existing.items() if path not in wanted]
    added = [
        parquet_file_to_data_file(io, tx.table_metadata, path)
        for path in wanted
        if path not in paths
    ]
    _snapshot(tx, marks, removed, added)
    # The snapshot the recorded pointer shows stays: if the runner stops before it
    # records the new pointer, the old one must still be readable.
    keep = current.metadata.current_snapshot_id if current is not None else None
    expired = _expire(tx, retention_s, keep)
    tx.commit_transaction()
    assert catalog.current is not None
    if expired:
        prune_manifests(catalog.current, retention_s)
    published = str(catalog.current.metadata_location)
    _PUBLISHED.put(published, frozenset(wanted), metadata_location)
    return published


def _begin(
    catalog: _PointerCatalog,
    identifier: tuple[str, ...],
    schema: pa.Schema,
    location: str,
    current: Any,
) -> Any:
    """A transaction on the current table, or creating it (``current`` None)."""
    if current is not None:
        return current.transaction()
    return catalog.create_table_transaction(
        identifier,
        schema,
        location=location,
        properties={
            "format-version": "2",
            TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED: "true",
            TableProperties.METADATA_PREVIOUS_VERSIONS_MAX: str(METADATA_KEEP),
            "ledgerlake.mirror": "latest-only: written by Ledgerlake, do not write",
        },
    )


def _snapshot(tx: Any, marks: dict[str, str], removed: list[Any], added: list[Any]) -> None:
    """One snapshot: an overwrite when files left, a fast append when files only came."""
    if removed:
        with tx.update_snapshot(snapshot_properties=marks).overwrite() as overwrite:
            for data_file in removed:
                overwrite.delete_data_file(data_file)
            for data_file in added:
                overwrite.append_data_file(data_file)
    elif added:
        with tx.update_snapshot(snapshot_properties=marks).fast_append() as append:
            for data_file in added:
                append.append_data_file(data_file)


def _evolve_schema(tx: Any, schema: pa.Schema) -> None:
    current = tx.table_metadata.schema()
    have = {f.name for f in current.fields}
    want = set(schema.names)
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

    target = _pyarrow_to_schema_without_ids(schema)
    if have == want and all(
        current.find_field(f.name).field_type == f.field_type for f in target.fields
    ):
        return
    with tx.update_schema(allow_incompatible_changes=True) as update:
        for name in have - want:
            update.delete_column(name)
        update.union_by_name(schema)


def _name_mapping(tx: Any) -> NameMapping:
    mapping: NameMapping = tx.table_metadata.schema().name_mapping
    return mapping


def _expire(tx: Any, retention_s: float, keep: int | None) -> bool:
    """Expire the snapshots that stopped being current more than ``retention_s`` ago
    (a reader that loaded one within the retention can still scan it), never the
    current one nor ``keep`` (the one the recorded pointer shows)."""
    metadata = tx.table_metadata
    cutoff_ms = int((datetime.now(UTC) - timedelta(seconds=retention_s)).timestamp() * 1000)
    replaced_at: dict[int, int] = {}
    log = list(metadata.snapshot_log)
    for entry, following in itertools.pairwise(log):
        replaced_at.setdefault(entry.snapshot_id, following.timestamp_ms)
    protected = {metadata.current_snapshot_id, keep}
    old = [
        s.snapshot_id
        for s in metadata.snapshots
        if s.snapshot_id not in protected
        and replaced_at.get(s.snapshot_id, s.timestamp_ms) < cutoff_ms
    ]
    if old:
        ExpireSnapshots(tx).by_ids(old).commit()
    return bool(old)


def prune_manifests(table: Table, retention_s: float) -> int:
    """Delete the manifest lists and manifests (``metadata/*.avro``) no remaining
    snapshot references and older than the retention; return how many. Only the
    mirror's own metadata: data files are never listed here."""
    referenced: set[str] = set()
    for snapshot in table.metadata.snapshots:
        referenced.add(snapshot.manifest_list)
        referenced.update(m.manifest_path for m in snapshot.manifests(table.io))
    fs, path = _filesystem(table.io, f"{table.metadata.location}/metadata")
    cutoff = datetime.now(UTC) - timedelta(seconds=retention_s)
    deleted = 0
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if not info.path.endswith(".avro") or info.mtime is None:
            continue
        uri = _uri_like(table.metadata.location, path, info.path)
        if uri in referenced or info.mtime.replace(tzinfo=UTC) > cutoff:
            continue
        fs.delete_file(info.path)
        deleted += 1
    return deleted


def _filesystem(io: Any, location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem pyiceberg reads ``location`` with, and the path in it."""
    from urllib.parse import urlparse

    parsed = urlparse(location)
    fs: pafs.FileSystem = io.fs_by_scheme(parsed.scheme or "file", parsed.netloc)
    path = f"{parsed.netloc}{parsed.path}" if parsed.scheme == "s3" else parsed.path
    return fs, path


def _uri_like(location: str, listed_root: str, listed: str) -> str:
    """A listed path written the way the metadata writes locations."""
    return f"{location}/metadata{listed[len(listed_root) :]}"
