"""Stored events: frozen msgspec structs in one tagged union, and their codec.

Events are past-tense facts. They are stored in a Redis Stream entry as four fields:
``t`` (type tag), ``v`` (schema version of the payload), ``tb`` (table name, so readers
can filter without decoding) and ``e`` (the JSON payload). The stream entry id *is* the
event id: it is assigned by XADD, ordered, and used as the projection position.

Schema versions: every struct has ``CURRENT_VERSION``. An entry written with an older
``v`` is upcast on read by the functions in ``UPCASTERS``; stored entries are never
rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeAlias

import msgspec

from events.positions import unpack_positions

CURRENT_VERSION = 1


class DataType(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A column type, independent of Arrow so that events stay pure data.

    ``kind`` is one of: null, bool, int8, int16, int32, int64, uint8, uint16, uint32,
    uint64, float32, float64, decimal, string, binary, date, time, timestamp, list,
    struct, map. Timestamps and times are stored in microseconds; ``tz`` is ``"UTC"``
    for instants and absent for wall-clock timestamps.
    """

    kind: str
    precision: int | None = None
    scale: int | None = None
    tz: str | None = None
    item: DataType | None = None
    key: DataType | None = None
    fields: tuple[Field, ...] | None = None


class Field(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A named, nullable column."""

    name: str
    type: DataType
    nullable: bool = True


class ColumnStats(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Per-file column statistics. ``min``/``max`` are JSON values (temporal values
    and decimals as ISO / decimal strings); absent when not meaningful."""

    null_count: int = 0
    min: Any = None
    max: Any = None


class DeletionVector(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """The rows of a Parquet file that are deleted (merge-on-read): their positions in
    the file (0-based physical row numbers), sorted, as little-endian uint32s.

    ``version`` is the table version whose event last added positions to it, so that
    ``(path, version)`` names one state of a file (see ``DataFile.identity``)."""

    version: int
    count: int
    positions: bytes

    def rows(self) -> list[int]:
        return unpack_positions(self.positions).tolist()


class FileDeletes(msgspec.Struct, frozen=True, gc=False):
    """Rows an event deletes from one current Parquet file, by position (packed as in
    ``DeletionVector``): they join the file's deletion vector."""

    path: str
    count: int
    positions: bytes


class DataFile(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """An immutable batch of rows: a Parquet file addressed by its key relative to the
    storage root, or, for a tiny write, rows *inlined* in the event itself.

    An inlined batch has ``inline`` set (an Arrow IPC stream) and a ``path`` of the form
    ``inline/<uuid>`` that names it but is no storage key. Everything that adds, removes
    or prunes files treats both kinds alike.
    """

    path: str
    rows: int
    size_bytes: int
    columns: dict[str, ColumnStats] = {}
    inline: bytes | None = None
    # Rows deleted from this file since it was written (merge-on-read); None: none.
    # ``rows``, ``size_bytes`` and ``columns`` always describe the file as written.
    deleted: DeletionVector | None = None

    @property
    def is_inline(self) -> bool:
        return self.inline is not None

    @property
    def live_rows(self) -> int:
        return self.rows - (self.deleted.count if self.deleted else 0)

    @property
    def identity(self) -> str:
        """Names the file's rows as they are: its path, and its deletion vector's
        version if it has one (the same path with more rows deleted is another state)."""
        return self.path if self.deleted is None else f"{self.path}#{self.deleted.version}"


class EventBase(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", gc=False
):
    """Fields every event carries.

    ``id`` is the stream entry id; it is not part of the stored payload and is filled in
    on read. ``version`` is the table version this event produced (empty table name and
    version 0 for registry events).
    """

    TYPE_VERSION: ClassVar[int] = CURRENT_VERSION

    id: str = ""
    org: str
    super_: str = msgspec.field(name="super")
    table: str = ""
    version: int = 0
    actor: str
    time: datetime
    request_id: str = ""


class OrgCreated(EventBase, frozen=True, tag="OrgCreated"):
    """An org appeared (recorded in the registry stream)."""


class SuperCreated(EventBase, frozen=True, tag="SuperCreated"):
    """A super table appeared inside an org (recorded in the registry stream)."""


class TableCreated(EventBase, frozen=True, tag="TableCreated"):
    """A table was created with an inferred schema; its version is 0 and it is empty.
    ``mirrors``: the mirror formats that publish it (None in events written before
    mirrors existed: the ``LEDGERLAKE_MIRRORS`` default applies)."""

    columns: tuple[Field, ...]
    mirrors: tuple[str, ...] | None = None


class SchemaEvolved(EventBase, frozen=True, tag="SchemaEvolved"):
    """The table schema changed: new nullable columns, or an all-null column got a type."""

    columns: tuple[Field, ...]
    added: tuple[str, ...] = ()
    promoted: tuple[str, ...] = ()


class RowsAppended(EventBase, frozen=True, tag="RowsAppended"):
    """New data files were added to the table."""

    files: tuple[DataFile, ...]
    rows: int


class TableOverwritten(EventBase, frozen=True, tag="TableOverwritten"):
    """Every current file was replaced by ``files``."""

    files: tuple[DataFile, ...]
    removed_files: tuple[str, ...]
    rows: int
    rows_removed: int


class FilesReplaced(EventBase, frozen=True, kw_only=True):
    """Base of the events that change files: ``removed_files`` left the table, ``files``
    joined it, and ``deletes`` deleted rows of current files by position (merge-on-read;
    every other current file stays as it was)."""

    files: tuple[DataFile, ...]
    removed_files: tuple[str, ...]
    deletes: tuple[FileDeletes, ...] = ()


class RowsUpserted(FilesReplaced, frozen=True, kw_only=True, tag="RowsUpserted"):
    """A merge by key: files holding matched keys were rewritten without those rows,
    and the incoming rows were written. ``updated`` rows replaced stored ones."""

    key: tuple[str, ...]
    inserted: int
    updated: int
    unchanged: int
    rows_removed: int
    newer_than: str | None = None


class RowsDeleted(FilesReplaced, frozen=True, kw_only=True, tag="RowsDeleted"):
    """Rows matching ``where`` (a validated SQL expression) or the key list ``keys``
    were removed; files holding them were rewritten without them."""

    rows_removed: int
    where: str | None = None
    keys: dict[str, list[Any]] | None = None


class TableCompacted(FilesReplaced, frozen=True, kw_only=True, tag="TableCompacted"):
    """Small files and inlined batches were merged; the rows are unchanged."""

    rows: int


class TableRestored(FilesReplaced, frozen=True, kw_only=True, tag="TableRestored"):
    """Version ``restored_version`` (schema and files) became current again."""

    restored_version: int
    columns: tuple[Field, ...]
    rows: int
    rows_removed: int


class VersionsExpired(EventBase, frozen=True, tag="VersionsExpired"):
    """Versions before ``before`` can no longer be queried or restored; files only they
    reference become garbage for ``ledgerlake gc``."""

    before: int
    older_than: datetime


class MirrorsChanged(EventBase, frozen=True, tag="MirrorsChanged"):
    """The set of mirror formats (``delta``, ``iceberg``) that publish this table
    changed. The rows do not change."""

    formats: tuple[str, ...]


class Policy(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """What principals with ``role`` on a table see of it: rows where ``row_filter``
    holds (a restricted SQL boolean expression; ``:principal.<attr>`` is the querying
    principal's attribute), without ``hidden`` columns, with ``masks`` applied
    (``null``: the value is NULL; ``hash``: the SHA-256 of its text)."""

    role: str
    row_filter: str | None = None
    hidden: tuple[str, ...] = ()
    masks: dict[str, str] = {}


class PoliciesSet(EventBase, frozen=True, tag="PoliciesSet"):
    """The table's row-level security and column masking policies were replaced."""

    policies: tuple[Policy, ...]


class TableDropped(EventBase, frozen=True, tag="TableDropped"):
    """The table was dropped. Its name is free again (a later ``TableCreated`` starts a
    new table whose versions continue the name's: they never repeat), its files become
    garbage for ``ledgerlake gc`` and its mirrors are removed. Its events stay in the
    stream: they are the audit trail."""

    rows: int


# -- principals, tokens and grants (the auth stream, ``<p>:{auth}:events``) -----------------
# ``org`` is the tenant the principal belongs to ("" for a platform admin); a grant's
# scope is its ``org`` / ``super`` / ``table``.


class PrincipalCreated(EventBase, frozen=True, tag="PrincipalCreated"):
    """A user or service principal was created. ``admin``: a platform admin, who may
    do anything in every org (the bootstrap admin is one)."""

    principal_id: str
    name: str
    kind: str
    attributes: dict[str, str] = {}
    admin: bool = False
    # The identity an external JWT names (its sub, client_id, email or username).
    external_id: str | None = None


class PrincipalChanged(EventBase, frozen=True, tag="PrincipalChanged"):
    """A principal's name, attributes or disabled flag changed (None: unchanged)."""

    principal_id: str
    name: str | None = None
    attributes: dict[str, str] | None = None
    disabled: bool | None = None


class TokenIssued(EventBase, frozen=True, tag="TokenIssued"):
    """An API token was issued; only its SHA-256 is kept."""

    token_id: str
    principal_id: str
    token_hash: str
    name: str = ""
    expires_at: datetime | None = None


class TokenRevoked(EventBase, frozen=True, tag="TokenRevoked"):
    token_id: str


class GrantAdded(EventBase, frozen=True, tag="GrantAdded"):
    """``role`` for ``principal_id`` on the scope ``org`` / ``super`` / ``table``."""

    grant_id: str
    principal_id: str
    role: str


class GrantRemoved(EventBase, frozen=True, tag="GrantRemoved"):
    grant_id: str


class RoleDefined(EventBase, frozen=True, tag="RoleDefined"):
    """A custom role of ``org``: a name for a set of permissions (``read``, ``write``,
    ``grant``). Defining it again changes it; an empty set retires it."""

    name: str
    permissions: tuple[str, ...]


AUTH_EVENTS = (
    PrincipalCreated,
    PrincipalChanged,
    TokenIssued,
    TokenRevoked,
    GrantAdded,
    GrantRemoved,
    RoleDefined,
)


Event: TypeAlias = (
    OrgCreated
    | SuperCreated
    | TableCreated
    | SchemaEvolved
    | RowsAppended
    | TableOverwritten
    | RowsUpserted
    | RowsDeleted
    | TableCompacted
    | TableRestored
    | VersionsExpired
    | MirrorsChanged
    | PoliciesSet
    | TableDropped
    | PrincipalCreated
    | PrincipalChanged
    | TokenIssued
    | TokenRevoked
    | GrantAdded
    | GrantRemoved
    | RoleDefined
)

TABLE_EVENTS = (
    TableCreated,
    SchemaEvolved,
    RowsAppended,
    TableOverwritten,
    RowsUpserted,
    RowsDeleted,
    TableCompacted,
    TableRestored,
    VersionsExpired,
    MirrorsChanged,
    PoliciesSet,
    TableDropped,
)

# (type tag, stored version) -> function upgrading the raw payload dict by one version.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}

_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def encode_event(event: EventBase) -> dict[str, bytes]:
    """Encode an event into stream entry fields."""
    payload = _encoder.encode(msgspec.structs.replace(event, id=""))
    tag = type(event).__struct_config__.tag
    return {
        "t": str(tag).encode(),
        "v": str(event.TYPE_VERSION).encode(),
        "tb": event.table.encode(),
        "e": payload,
    }


def decode_event(
    entry_id: str | bytes, fields: Mapping[bytes, bytes] | Mapping[str, bytes]
) -> Event:
    """Decode a stream entry, upcasting old payload versions, and set ``id``."""
    get = _field_getter(fields)
    raw = get("e")
    if raw is None:
        raise ValueError(f"stream entry {entry_id!r} has no event payload")
    version = int(get("v") or CURRENT_VERSION)
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if version == CURRENT_VERSION:
        event = _decoder.decode(raw)
    else:
        data = msgspec.json.decode(raw)
        tag = data.get("type", "")
        while version < CURRENT_VERSION:
            data = UPCASTERS[(tag, version)](data)
            version += 1
        event = msgspec.convert(data, Event)
    return msgspec.structs.replace(event, id=eid)


def _field_getter(fields: Mapping[Any, bytes]) -> Callable[[str], bytes | None]:
    def get(name: str) -> bytes | None:
        value = fields.get(name.encode())
        if value is None:
            value = fields.get(name)
        return value

    return get


def to_builtins(event: EventBase) -> dict[str, Any]:
    """The event as a JSON-ready dict (for the audit API): its type tag, every common
    field (even when it has its default value) and the type's own fields."""
    data: dict[str, Any] = msgspec.to_builtins(event, builtin_types=(datetime,))
    common = {
        "id": event.id,
        "type": data.pop("type"),
        "org": event.org,
        "super": event.super_,
        "table": event.table,
        "version": event.version,
        "actor": event.actor,
        "time": event.time,
        "request_id": event.request_id,
    }
    return {**common, **{k: v for k, v in data.items() if k not in common}}


def now() -> datetime:
    """The current time, in UTC, truncated to milliseconds (the stream id resolution)."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def stream_id_tuple(entry_id: str) -> tuple[int, int]:
    """Parse a stream id ``"<ms>-<seq>"`` into a comparable tuple."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
