"""The source of truth: ``model.py`` (stored event structs, the codec, upcasters),
``positions.py`` (the row positions of deletion vectors),
``log.py`` and ``redis_log.py`` (the ``EventLog`` port and its Redis Streams adapter),
``archive.py`` (the archive format), ``errors.py`` (domain errors), ``storage/`` (the
object storage port and backends).

The lowest layer: it imports nothing of the project outside ``events``.
"""
