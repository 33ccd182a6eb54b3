"""Mirror writers: latest-only Delta Lake and Iceberg tables over the canonical Parquet
files. One module per format (``delta.py``, ``iceberg.py``), each published by a
``MirrorRunner`` (``runner.py``) on its own consumer group; ``FORMATS`` is the registry.
Adding a format: its module, its name here, its branch in ``publisher.py``, its tests.

May import ``events`` and ``projections``; nothing of ``app``."""

FORMATS = ("delta", "iceberg")
