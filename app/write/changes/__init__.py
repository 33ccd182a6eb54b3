"""The change side of the write path: changes of a table's rows (merge-on-read, or
copy-on-write per file) and of the table itself (upsert, delete, compact, restore,
drop, mirrors, policies, expire), sharing one commit loop (``commit.py``) and the row
work (``rows.py``; ``indexed.py`` by the key indexes of ``keyindex.py``); ``mutator.py``
composes them.

May import ``app.write`` (bodies, append), ``app.access.policies`` and the layers below.
"""
