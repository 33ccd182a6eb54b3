"""Request bodies in the binary formats, built with pyarrow."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def arrow_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC stream."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
