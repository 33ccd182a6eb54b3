"""From a request body (or a file) to a Parquet data file that fits the table's schema.

The body is parsed by its format, its columns are checked against the table's schema
(see ``projections.arrow`` for the rules), and the rows are written with pyarrow as one
zstd-compressed Parquet file, with per-column statistics. All of this happens in a
staging area: nothing is visible until the file is published and its event appended.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from events.errors import InvalidInput, TypeMismatch
from events.model import ColumnStats, DataType, Field
from projections.arrow import (
    StatsAccumulator,
    conform,
    from_arrow,
    normalize_array,
    normalize_type,
    to_arrow,
    type_name,
)

CONTENT_TYPES = {
    "application/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/vnd.apache.arrow.stream": "arrow",
}
EXTENSIONS = {
    ".json": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".arrows": "arrow",
}
TEXT_FORMATS = frozenset({"json", "ndjson", "csv"})
BATCH_ROWS = 65_536
MAX_COLUMN_NAME = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def format_for_content_type(content_type: str | None) -> str:
    """The body format for a Content-Type header; InvalidInput (415) if unsupported."""
    media = (content_type or "").split(";")[0].strip().lower()
    fmt = CONTENT_TYPES.get(media)
    if fmt is None:
        raise InvalidInput(
            f"unsupported Content-Type {media or '(none)'!r}; use one of: "
            + ", ".join(sorted(CONTENT_TYPES)),
            code="unsupported_media_type",
        )
    return fmt


def format_for_path(path: Path) -> str:
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInput(
            f"cannot tell the format of {path.name!r}; use one of "
            + ", ".join(sorted(EXTENSIONS))
            + " or pass --format",
            code="unknown_format",
        )
    return fmt


# -- reading sources ------------------------------------------------------------------


@dataclass
class Source:
    """A parsed body: its (normalized) fields and a way to iterate its batches again."""

    fields: list[Field]
    batches: Callable[[], Iterator[pa.RecordBatch]]
    text: bool
    # The number of rows, when the format tells it without reading them (None: unknown).
    rows: int | None = None


def open_source(path: Path, fmt: str, known: dict[str, DataType]) -> Source:
    """Parse ``path`` as ``fmt``. ``known`` (the table's columns) guides CSV parsing."""
    if fmt in ("json", "ndjson"):
        table = _read_json(path, ndjson=fmt == "ndjson")
        return _from_table(table, text=True)
    if fmt == "csv":
        return _from_table(_read_csv(path, known), text=True)
    if fmt == "parquet":
        return _read_parquet(path)
    if fmt == "arrow":
        return _read_arrow(path)
    raise InvalidInput(f"unknown format {fmt!r}", code="unknown_format")


def _fields(schema: pa.Schema) -> list[Field]:
    check_column_names([f.name for f in schema])
    return [Field(name=f.name, type=from_arrow(normalize_type(f.type), f.name)) for f in schema]


# DuckDB's virtual column of each row's position in its Parquet file: a table column
# of that name would shadow it (and the option that names it refuses such files).
RESERVED_COLUMNS = frozenset({"file_row_number"})


def check_column_names(names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        if not name or len(name) > MAX_COLUMN_NAME or _CONTROL.search(name):
            raise InvalidInput(
                f"invalid column name {name!r}: 1 to {MAX_COLUMN_NAME} characters, "
                "no control characters",
                code="invalid_column_name",
            )
        folded = name.lower()
        if folded in RESERVED_COLUMNS:
            raise InvalidInput(
                f"column name {name!r} is reserved: DuckDB gives every Parquet row a "
                "virtual column of that name, which upserts and deletes rely on",
                code="reserved_column_name",
            )
        if folded in seen:
            raise InvalidInput(
                f"duplicate column name {name!r} (column names are case-insensitive)",
                code="duplicate_column",
            )
        seen[folded] = name


def _from_table(table: pa.Table, *, text: bool) -> Source:
    fields = _fields(table.schema)
    return Source(
        fields=fields,
        batches=lambda: iter(table.to_batches(BATCH_ROWS)),
        text=text,
        rows=table.num_rows,
    )


def _read_json(path: Path, *, ndjson: bool) -> pa.Table:
    raw = path.read_bytes()
    try:
        if ndjson:
            rows = [msgspec.json.decode(line) for line in raw.splitlines() if line.strip()]
        else:
            rows = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}", code="invalid_json") from exc
    if not isinstance(rows, list):
        raise InvalidInput("the JSON body must be an array of objects", code="invalid_json")
    columns: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(
                f"row {i} is a JSON {type(row).__name__}, not an object", code="invalid_json"
            )
        for key in row:
            if key not in columns:
                columns[key] = [None] * i
        for key, values in columns.items():
            values.append(row.get(key))
    arrays = {}
    for name, values in columns.items():
        _check_bools_alone(name, values)
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeMismatch(
                f"column {name!r} mixes value types that cannot share one column ({exc})",
                code="mixed_types",
                column=name,
            ) from exc
        except OverflowError as exc:
            raise TypeMismatch(
                f"column {name!r} has an integer outside the 64-bit range ({exc})",
                code="value_out_of_range",
                column=name,
            ) from exc
    check_column_names(list(arrays))
    return pa.table(arrays) if arrays else pa.table({})


def _check_bools_alone(name: str, values: list[Any]) -> None:
    """pyarrow would turn ``true`` into 1.0 next to numbers: refuse the mix instead."""
    kinds = {type(v) for v in values if v is not None}
    if bool in kinds and kinds & {int, float}:
        raise TypeMismatch(
            f"column {name!r} mixes booleans and numbers", code="mixed_types", column=name
        )


_CSV_COLUMN = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?(.*)")


def _read_csv(path: Path, known: dict[str, DataType]) -> pa.Table:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    check_column_names(header)
    # Parse known columns as their table type (a failed conversion names the column);
    # new columns are inferred.
    column_types = {
        name: to_arrow(t)
        for name, t in known.items()
        if name in header and t.kind not in ("null", "list", "map", "struct")
    }
    convert = pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, convert_options=convert)
    except pa.ArrowInvalid as exc:
        message = str(exc)
        match = _CSV_COLUMN.search(message)
        name = header[int(match.group(1))] if match else ""
        if match and name in known:
            want = known[name]
            why = match.group(2)
            bad = _first_bad_csv_value(path, name, column_types[name])
            if bad is not None and repr(bad) not in why:
                why = f"{bad!r}: {why}"
            raise TypeMismatch(
                f"column {name!r} has type {type_name(want)} but the CSV has a value that is "
                f"not one: {why}",
                column=name,
                expected=type_name(want),
                actual="string",
            ) from exc
        raise InvalidInput(f"malformed CSV: {message}", code="invalid_csv") from exc


def _first_bad_csv_value(path: Path, name: str, target: pa.DataType) -> str | None:
    """On the error path only: the first value of a CSV column that does not convert
    (pyarrow does not always say which one)."""
    try:
        strings = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=[name], column_types={name: pa.string()}
            ),
        ).column(name)
    except pa.ArrowInvalid:
        return None
    for value in strings.to_pylist():
        if value in (None, ""):
            continue
        try:
            pacsv.read_csv(
                pa.py_buffer(('x\n"' + value.replace('"', '""') + '"\n').encode()),
                convert_options=pacsv.ConvertOptions(column_types={"x": target}),
            )
        except pa.ArrowInvalid:
            return str(value)
    return None


def _read_parquet(path: Path) -> Source:
    try:
        parquet = pq.ParquetFile(path)
        schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"malformed Parquet: {exc}", code="invalid_parquet") from exc

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInput(f"malformed Parquet: {exc}", code="invalid_parquet") from exc

    return Source(fields=_fields(schema), batches=batches, text=False, rows=rows)


def _read_arrow(path: Path) -> Source:
    try:
        with pa.memory_map(str(path)) as src:
            schema = pa.ipc.open_stream(src).schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"malformed Arrow IPC stream: {exc}", code="invalid_arrow") from exc

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            with pa.memory_map(str(path)) as src:
                yield from pa.ipc.open_stream(src)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInput(f"malformed Arrow IPC stream: {exc}", code="invalid_arrow") from exc

    return Source(fields=_fields(schema), batches=batches, text=False)


# -- schema evolution -----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How incoming columns land in the table: the resulting table schema, what changed,
    and the type each incoming column is written as."""

    columns: tuple[Field, ...]
    added: tuple[str, ...]
    promoted: tuple[str, ...]
    targets: dict[str, DataType]

    @property
    def schema_changed(self) -> bool:
        return bool(self.added or self.promoted)


def plan_schema(current: tuple[Field, ...] | None, incoming: list[Field], *, text: bool) -> Plan:
    """Decide the table schema after writing ``incoming``. TypeMismatch on conflict.

    Value-level checks happen while writing (``conform``); this is the type-level part.
    """
    if current is None:
        cols = tuple(incoming)
        return Plan(cols, tuple(f.name for f in cols), (), {f.name: f.type for f in cols})
    by_folded = {f.name.lower(): f for f in current}
    columns = list(current)
    added: list[str] = []
    promoted: list[str] = []
    targets: dict[str, DataType] = {}
    for field in incoming:
        existing = by_folded.get(field.name.lower())
        if existing is None:
            columns.append(field)
            added.append(field.name)
            targets[field.name] = field.type
        elif existing.name != field.name:
            raise InvalidInput(
                f"column {field.name!r} differs only in case from the table's column "
                f"{existing.name!r}",
                code="column_case_mismatch",
            )
        elif existing.type.kind == "null" and field.type.kind != "null":
            columns[columns.index(existing)] = field
            promoted.append(field.name)
            targets[field.name] = field.type
        else:
            targets[field.name] = existing.type
    return Plan(tuple(columns), tuple(added), tuple(promoted), targets)


# -- writing --------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenFile:
    rows: int
    stats: dict[str, ColumnStats]
    targets: dict[str, DataType]


def conformed_batches(
    source: Source,
    plan: Plan,
    accumulators: dict[str, StatsAccumulator],
) -> Iterator[pa.RecordBatch]:
    """The source's rows, each column conformed to ``plan.targets`` (TypeMismatch if a
    value does not fit), with statistics gathered on the way."""
    names = [f.name for f in source.fields]
    schema = pa.schema([pa.field(n, to_arrow(plan.targets[n])) for n in names])
    for batch in source.batches():
        if batch.num_rows == 0:
            continue
        arrays = []
        for name in names:
            column = pa.chunked_array([batch.column(name)])
            column = conform(
                normalize_array(column, name), plan.targets[name], name, text=source.text
            )
            accumulators[name].add(column)
            arrays.append(column.combine_chunks())
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _accumulators(source: Source, plan: Plan) -> dict[str, StatsAccumulator]:
    return {f.name: StatsAccumulator(plan.targets[f.name]) for f in source.fields}


def conform_table(source: Source, plan: Plan) -> tuple[pa.Table, WrittenFile]:
    """All of a (small) source in memory, conformed to the plan: for inlined batches
    and for the incoming side of an upsert."""
    accumulators = _accumulators(source, plan)
    names = [f.name for f in source.fields]
    schema = pa.schema([pa.field(n, to_arrow(plan.targets[n])) for n in names])
    table = pa.Table.from_batches(list(conformed_batches(source, plan, accumulators)), schema)
    if table.num_rows == 0:
        raise InvalidInput("the body contains no rows", code="no_rows")
    return table, WrittenFile(
        rows=table.num_rows,
        stats={n: acc.result() for n, acc in accumulators.items()},
        targets=dict(plan.targets),
    )


def table_source(table: pa.Table) -> Source:
    """A source over rows that already have the table's types (merge outputs)."""
    return _from_table(table, text=False)


def write_parquet(
    source: Source,
    plan: Plan,
    staged: Path,
    *,
    row_group_rows: int,
    zstd_level: int,
    progress: Callable[[int], None] | None = None,
) -> WrittenFile:
    """Write the source's rows, conformed to ``plan.targets``, as one Parquet file."""
    names = [f.name for f in source.fields]
    schema = pa.schema([pa.field(n, to_arrow(plan.targets[n])) for n in names])
    accumulators = _accumulators(source, plan)
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(
        staged,
        schema,
        compression="zstd",
        compression_level=zstd_level,
        write_statistics=True,
    ) as writer:
        for batch in conformed_batches(source, plan, accumulators):
            pending.append(batch)
            pending_rows += batch.num_rows
            rows += batch.num_rows
            if pending_rows >= row_group_rows:
                writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
                pending, pending_rows = [], 0
            if progress is not None:
                progress(rows)
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_rows)
    if rows == 0:
        raise InvalidInput("the body contains no rows", code="no_rows")
    return WrittenFile(
        rows=rows,
        stats={n: acc.result() for n, acc in accumulators.items()},
        targets=dict(plan.targets),
    )
