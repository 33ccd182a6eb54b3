"""The change side of the write path: copy-on-write changes of a table's rows and of
the table itself (upsert, delete, compact, restore, drop, mirrors, policies, expire),
sharing one commit loop (``commit.py``); ``mutator.py`` composes them.

May import ``app.write`` (bodies, append), ``app.access.policies`` and the layers below.
"""
