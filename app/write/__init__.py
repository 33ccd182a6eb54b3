"""The command side: a write becomes a data file and events. ``request.py`` (what a write
asks and answers), ``bodies.py`` (parse a body and conform it to the table's schema),
``files.py`` (inline or publish the data file), ``append.py`` (the ``Writer``: append the
events in the table's turn), ``changes/`` (upsert, delete, compact, restore, expire).

May import ``app.access`` (policies), ``app.settings`` and the layers below
(``events``, ``projections``); never ``app.api``, ``app.ops`` or ``app.services``.
"""
