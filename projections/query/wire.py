"""What the service and a query worker process send each other (msgpack frames).

The service sends the worker its ``EngineConfig`` once, then one ``Job`` per query. The
worker answers a job with frames tagged by their first byte: ``s`` the result's Arrow
schema, ``b`` a record batch (Arrow IPC), then ``e`` (``End``) or ``x`` (``Failure``).
"""

from __future__ import annotations

import msgspec

from events.model import DataFile, Field

SCHEMA, BATCH, END, FAILURE, READY = b"s", b"b", b"e", b"x", b"r"


class EngineConfig(msgspec.Struct, frozen=True):
    """What every connection of an engine is opened with; for a worker also its
    process limits and where its queries spill."""

    threads: int
    memory_limit: str
    max_temp_bytes: str
    extension_dir: str | None = None
    s3: bool = False
    # A worker process's address space (RLIMIT_AS), bytes; 0: no limit.
    address_space: int = 0
    max_result_bytes: int = 64 * 1024 * 1024
    temp_root: str = ""
    pooled: int = 4


class View(msgspec.Struct, frozen=True):
    """One view of a query: a table version's columns and files, and the policy it is
    read through (``select`` of the rows where ``where`` holds), if any."""

    columns: tuple[Field, ...]
    files: tuple[DataFile, ...]
    select: str | None = None
    where: str | None = None


class Job(msgspec.Struct, frozen=True):
    """One query: ``key`` names what its connection shows (equal keys, equal views), so a
    worker may serve it on a connection it kept; ``paths`` maps each file's key to the
    path the engine reads."""

    key: str
    views: dict[str, View]
    paths: dict[str, str]
    sql: str
    limit: int
    offset: int
    timeout: float
    run_for: float
    plan_only: bool
    secret: dict[str, str] | None = None


class End(msgspec.Struct, frozen=True):
    """A job's end: whether the result was cut, how long it ran, the plan (for a plan
    job); the connection it ran on (a serial number in its worker), whether that was a
    kept one, and the keys the worker keeps now."""

    truncated: bool
    elapsed_ms: float
    plan: str | None = None
    connection: int = 0
    reused: bool = False
    kept: tuple[str, ...] = ()


class Failure(msgspec.Struct, frozen=True):
    """A job's error, as the domain error the service raises, and like ``End`` the
    connection it ran on (0: none was opened) and the keys the worker keeps now."""

    kind: str
    message: str
    code: str
    connection: int = 0
    reused: bool = False
    kept: tuple[str, ...] = ()
