"""Folds of the events and the runners that keep them: ``catalog.py`` (the catalog fold),
``auth.py`` (principals and grants), ``store.py`` (snapshots), ``reader.py`` (consistent
reads), ``runner.py`` and ``archiver.py`` (projection runners), ``replay.py`` (rebuild and
verify), ``arrow.py`` (types), ``query/`` (the sandboxed DuckDB engine).

May import ``events`` only.
"""
