"""DuckDB extensions installed offline from the ``duckdb-extension-<name>`` wheels."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import duckdb

from projections.arrow import sql_literal

# Every extension the project ships offline: httpfs reads S3 (installed when storage is
# S3); delta and iceberg (which needs avro) are for the mirrors.
EXTENSIONS = ("httpfs", "avro", "delta", "iceberg")


def install_extensions(directory: Path, names: Iterable[str]) -> None:
    """Install DuckDB extensions into ``directory`` from the ``duckdb-extension-<name>``
    wheels built for the pinned DuckDB: nothing is downloaded at run time. Already
    installed extensions are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"extension_directory": str(directory)})
    try:
        installed = {
            row[0]
            for row in con.execute(
                "select extension_name from duckdb_extensions() where installed"
            ).fetchall()
        }
        for name in names:
            if name in installed:
                continue
            module = importlib.import_module(f"duckdb_extension_{name}")
            version = duckdb.__version__
            shipped = Path(module.__file__ or "").parent / "extensions" / f"v{version}"
            binary = shipped / f"{name}.duckdb_extension"
            if not binary.exists():
                raise RuntimeError(
                    f"duckdb-extension-{name} has no build for DuckDB {version} at {binary}"
                )
            con.execute(f"INSTALL {sql_literal(str(binary))}")
    finally:
        con.close()
