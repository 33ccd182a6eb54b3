"""Object storage for immutable data files: the ``Storage`` port (``port.py``), the local
directory backend (``local.py``) and the S3 backend (``s3.py``).

It sits inside ``events/`` (the lowest layer) because every layer writes or reads files:
ingestion, the query engine, the mirrors and the event archive. It imports
``events.errors`` only.
"""
