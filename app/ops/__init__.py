"""Operations: ``recover.py`` (a lost Redis from the archive), ``rebuild.py`` (the lossy
rebuild from storage), ``transfer.py`` (export and import), ``gc.py`` (orphan files) and
``embedded_redis.py`` (the redis-server of the embedded default).

May import ``app.services``, ``app.write`` and the layers below; only ``app.cli``
imports it.
"""
