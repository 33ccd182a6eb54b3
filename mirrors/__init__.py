"""Mirror writers: latest-only Delta Lake and Iceberg tables over the canonical Parquet
files (issue 5). Each format will be one module here (``delta.py``, ``iceberg.py``) run
as its own projection on its own consumer group, registered in ``MIRRORS``."""

MIRRORS: dict[str, str] = {}
