"""The ``Mutator``: every change of a table, one class composed of the
changes' modules (the services hold one)."""

from __future__ import annotations

from app.write.changes.compact import Compaction
from app.write.changes.delete import Deletes
from app.write.changes.table import TableChanges
from app.write.changes.upsert import Upserts


class Mutator(Upserts, Deletes, Compaction, TableChanges):
    """Upserts, deletes, compaction, restore and expiry of tables."""
