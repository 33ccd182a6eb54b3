"""The Delta mirror: each table's latest version as a Delta Lake table, with deltalake.

The table root is ``<org>/<super>/<table>/``: the log is ``_delta_log/`` next to the
canonical ``data/`` files, which the log's add actions reference in place by relative
path. Each publish is one Delta commit: add actions for new files, remove actions for
files the table no longer has (new columns come first, in an ADD COLUMNS commit marked
with the position the table already reflected). The commitInfo carries
``ledgerlake.position`` (the stream id of the event the commit reflects),
``ledgerlake.version`` and ``ledgerlake.incarnation``, and an app transaction
``ledgerlake`` holds the table version, so readers can tell which version they see.

Maintenance is deltalake's own post-commit hook: a checkpoint every
``checkpoint_interval`` commits, and log entries older than the retention (and older
than the last checkpoint) are deleted. Nothing here ever vacuums: data files are never
deleted by the mirror.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable
from deltalake import Field as DeltaField
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    PostCommitHookProperties,
    RemoveAction,
    Transaction,
    create_table_with_add_actions,
)

from mirrors.plan import MirrorFile

POSITION = "ledgerlake.position"
VERSION = "ledgerlake.version"
INCARNATION = "ledgerlake.incarnation"
APP_ID = "ledgerlake"


class SchemaConflict(Exception):
    """A column of the table has another type in the Delta schema."""


def committed(location: str, options: dict[str, str]) -> dict[str, str] | None:
    """The ``ledgerlake.*`` marks of the latest commit: {} if there is no table, None
    if there is a log that cannot be loaded (a checkpoint hint without its checkpoint,
    a missing commit...). A storage outage raises."""
    try:
        table = DeltaTable(location, storage_options=options)
    except TableNotFoundError:
        return {}
    except DeltaError as exc:
        if _unreachable(exc):
            raise
        return None
    for entry in table.history(1):
        return {k: str(v) for k, v in entry.items() if k.startswith("ledgerlake.")}
    return {}


def publish(
    location: str,
    options: dict[str, str],
    schema: pa.Schema,
    files: Sequence[MirrorFile],
    relative: Any,
    *,
    version: int,
    position: str,
    incarnation: str,
    checkpoint_interval: int,
    retention_s: float,
    fresh: bool,
) -> int:
    """Make the Delta table at ``location`` hold exactly ``files`` under ``schema``;
    return the Delta version written. ``relative(key)``: a file's path from the table
    root. ``fresh``: (re)create the table (the caller removed any old log)."""
    marks = {POSITION: position, VERSION: str(version), INCARNATION: incarnation}
    commit = CommitProperties(
        custom_metadata=marks,
        app_transactions=[Transaction(APP_ID, version, int(time.time() * 1000))],
    )
    hooks = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=True)
    now_ms = int(time.time() * 1000)
    adds = {relative(f.key): _add(relative(f.key), f, now_ms) for f in files}
    if fresh:
        create_table_with_add_actions(
            location,
            DeltaSchema.from_arrow(schema),
            list(adds.values()),
            mode="error",
            configuration={
                "delta.checkpointInterval": str(max(1, checkpoint_interval)),
                "delta.logRetentionDuration": f"interval {max(1, int(retention_s))} seconds",
                "delta.enableExpiredLogCleanup": "true",
            },
            storage_options=options,
            commit_properties=commit,
            post_commithook_properties=hooks,
        )
        return 0
    table = DeltaTable(location, storage_options=options)
    _evolve(table, schema, hooks)
    current = {a["path"]: a for a in _add_actions(table)}
    actions: list[AddAction | RemoveAction] = [
        RemoveAction(path, True, now_ms, size=int(a["size_bytes"]), partition_values={})
        for path, a in current.items()
        if path not in adds
    ]
    actions += [add for path, add in adds.items() if path not in current]
    table.create_write_transaction(
        actions,
        "append",
        table.schema(),
        commit_properties=commit,
        post_commithook_properties=hooks,
    )
    table.update_incremental()
    return int(table.version())


def _evolve(table: DeltaTable, schema: pa.Schema, hooks: PostCommitHookProperties) -> None:
    """Add the schema's new columns to the Delta table; a column whose type changed is a
    ``SchemaConflict`` (Delta cannot retype one)."""
    have = {f.name: f.type for f in table.schema().fields}
    for f in DeltaSchema.from_arrow(schema).fields:
        if f.name in have and have[f.name] != f.type:
            raise SchemaConflict(f"column {f.name!r} is {have[f.name]} in Delta, {f.type} now")
    new_columns = _new_columns(table, schema)
    if new_columns:
        # A commit of its own (an append ignores a new schema), marked with the position
        # the table already reflects: the files that use the columns come next.
        previous = {k: v for k, v in table.history(1)[0].items() if k.startswith("ledgerlake.")}
        table.alter.add_columns(
            new_columns,
            commit_properties=CommitProperties(custom_metadata=previous),
            post_commithook_properties=hooks,
        )
        table.update_incremental()


def _unreachable(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("connect", "timed out", "timeout", "dns", "503", "network"))


def _add(path: str, f: MirrorFile, now_ms: int) -> AddAction:
    return AddAction(path, f.size_bytes, {}, now_ms, True, json.dumps({"numRecords": f.rows}))


def _add_actions(table: DeltaTable) -> list[dict[str, Any]]:
    batch = table.get_add_actions(flatten=True)
    rows: list[dict[str, Any]] = pa.table(batch).select(["path", "size_bytes"]).to_pylist()
    return rows


def _new_columns(table: DeltaTable, schema: pa.Schema) -> list[DeltaField]:
    """Columns of ``schema`` the Delta table lacks. (Delta cannot drop a column without
    column mapping: a column the table no longer has, after a restore to an older
    schema, stays in the Delta schema and reads as null; if it comes back with another
    type, ``publish`` raises SchemaConflict and the mirror is created again.)"""
    have = {f.name for f in table.schema().fields}
    wanted = DeltaSchema.from_arrow(schema)
    return [DeltaField(f.name, f.type, nullable=True) for f in wanted.fields if f.name not in have]
