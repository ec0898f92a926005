"""Best-fit-decreasing packing of examples into bins of at most `capacity` tokens.

Packing is an index computation over the cached lengths: a bin is a list of example
indices, stored as two flat arrays (`order` grouped by bin, `offsets` into it), so a
packed dataset costs 8 bytes per row whatever its size, and packing never copies tokens.

Best fit decreasing (TRL's default `packing_strategy="bfd"`) puts each example, longest
first, into the fullest bin it still fits. Examples of equal length are placed in bulk:
a bin with room `c` takes `c // l` examples of length `l` in a row, because after each
one it is still the fullest bin that fits (no other bin has room in [l, c)). That keeps
the work proportional to the number of examples plus distinct (length, room) pairs,
not examples x bins.
"""
from __future__ import annotations

import bisect

import numpy as np


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): bin b holds examples order[offsets[b]:offsets[b+1]]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"lengths must be in [1, {capacity}]")
    item_bin = np.empty(len(lengths), dtype=np.int64)
    by_length = np.argsort(-lengths, kind="stable")
    bounds = np.flatnonzero(np.diff(lengths[by_length])) + 1
    bins_with_room: dict[int, list[int]] = {}  # room -> bin ids
    rooms: list[int] = []  # sorted rooms that have bins
    n_bins = 0

    def add(room: int, bins: list[int]) -> None:
        if not bins:
            return
        if room not in bins_with_room:
            bins_with_room[room] = []
            bisect.insort(rooms, room)
        bins_with_room[room].extend(bins)

    for items in np.split(by_length, bounds):
        if not len(items):
            continue
        size = int(lengths[items[0]])
        pos = 0
        while pos < len(items):
            left = len(items) - pos
            j = bisect.bisect_left(rooms, size)
            if j == len(rooms):  # no bin fits: open bins, each taking capacity // size
                per = capacity // size
                k = -(-left // per)
                new = list(range(n_bins, n_bins + k))
                item_bin[items[pos:]] = np.repeat(new, per)[:left]
                n_bins += k
                add(capacity - per * size, new[:-1])
                add(capacity - (left - (k - 1) * per) * size, new[-1:])
                break
            room = rooms[j]
            bins = bins_with_room[room]
            per = room // size
            full = min(len(bins), left // per)
            if full:
                item_bin[items[pos : pos + full * per]] = np.repeat(bins[:full], per)
                pos += full * per
                moved, bins[:] = bins[:full], bins[full:]
                add(room - per * size, moved)
            elif left:  # fewer examples left than one bin takes
                item_bin[items[pos:]] = bins[0]
                moved, bins[:] = bins[:1], bins[1:]
                add(room - left * size, moved)
                pos = len(items)
            if not bins:
                del bins_with_room[room]
                rooms.remove(room)
    order = np.argsort(item_bin, kind="stable")
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_bin, minlength=n_bins), out=offsets[1:])
    return order, offsets
