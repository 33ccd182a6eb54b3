"""Row positions as deletion vectors store them: sorted, unique, little-endian uint32s
(``DeletionVector.positions``, ``FileDeletes.positions``)."""

from __future__ import annotations

import bisect
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable


def pack_positions(positions: Iterable[int]) -> bytes:
    """Row positions as a ``DeletionVector`` stores them (sorted, unique)."""
    out = array("I", sorted(set(positions)))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def unpack_positions(packed: bytes) -> array[int]:
    """Packed positions (as a ``DeletionVector`` stores them) as an ``array`` of uint32."""
    out = array("I")
    out.frombytes(packed)
    if sys.byteorder != "little":
        out.byteswap()
    return out


class _Merged:
    """The last merges of position lists, by value, within a byte budget: every process
    folds each change three times (its writer, its reader, its projector), and a
    change merges its vectors once in advance, off the event loop."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.lock = threading.Lock()
        self.entries: OrderedDict[tuple[bytes, bytes], tuple[int, bytes]] = OrderedDict()

    def get(self, key: tuple[bytes, bytes]) -> tuple[int, bytes] | None:
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
            return found

    def put(self, key: tuple[bytes, bytes], value: tuple[int, bytes]) -> None:
        size = len(key[0]) + len(key[1]) + len(value[1])
        if size > self.budget // 4:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = value
            self.used += size
            while self.used > self.budget:
                (a, b), (_, merged) = self.entries.popitem(last=False)
                self.used -= len(a) + len(b) + len(merged)


_MERGED = _Merged(32 * 1024 * 1024)


def merge_positions(a: bytes, b: bytes) -> tuple[int, bytes]:
    """(count, packed) of the union of two packed position lists. Linear copies around
    a binary search per position of the shorter one (a set and a sort were 3x slower),
    remembered by value (``_Merged``): an upsert adds a few positions to a file's
    vector, and every fold of it, three per process, is on some event loop."""
    found = _MERGED.get((a, b))
    if found is not None:
        return found
    old, new = unpack_positions(a), unpack_positions(b)
    if len(new) > len(old):
        old, new = new, old
    out = array("I")
    at = 0
    for p in new:
        i = bisect.bisect_left(old, p, at)
        out.extend(old[at:i])
        if i == len(old) or old[i] != p:
            out.append(p)
        at = i
    out.extend(old[at:])
    count = len(out)
    if sys.byteorder != "little":
        out.byteswap()
    merged = (count, out.tobytes())
    _MERGED.put((a, b), merged)
    return merged
