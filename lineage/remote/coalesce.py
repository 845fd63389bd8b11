"""Neighbouring small ranges of a remote file, fetched as one request.

A unit reads many small tensors (norms, biases, routers, FP8 scales) and,
sampled, many 256 KiB blocks. Each as its own request would pay a round
trip for a few KB. Before a unit runs, the worker tells the reader every
byte range it will read (`Reader.expect`); ranges of one file closer than
GAP are merged into spans of at most SPAN_MAX, and a small read inside a
span fetches the whole span once. At most KEEP spans are held, so memory
stays bounded whatever the unit. Reads of a range larger than SPAN_MAX (a
big tensor, read chunk by chunk) go straight to the file, each chunk its
own request (split into concurrent pieces there).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from lineage.remote import RangeFile

#: Ranges this close are fetched together: the gap's bytes cost less than a round trip.
GAP = 64 << 10
#: Largest merged span.
SPAN_MAX = 4 << 20
#: Spans held at once per reader (all files together).
KEEP = 8


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans covering `ranges`, neighbours within GAP joined while at most SPAN_MAX."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a - out[-1][1] <= GAP and max(b, out[-1][1]) - out[-1][0] <= SPAN_MAX:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


class Coalescer:
    def __init__(self) -> None:
        self.spans: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        self.held: OrderedDict[tuple[str, int], bytearray] = OrderedDict()
        self.lock = threading.Lock()

    def plan(self, ranges: dict[str, list[tuple[int, int]]]) -> None:
        for url, rs in ranges.items():
            spans = merge(rs)
            self.spans[url] = ([s for s, _ in spans], spans)

    def read(self, rf: RangeFile, offset: int, out: memoryview) -> None:
        n = len(out)
        planned = self.spans.get(rf.url)
        if planned is not None and n < SPAN_MAX:
            starts, spans = planned
            i = bisect.bisect_right(starts, offset) - 1
            if i >= 0:
                s, e = spans[i]
                if s <= offset and offset + n <= e and n < e - s <= SPAN_MAX:
                    out[:] = self._span(rf, s, e)[offset - s : offset - s + n]
                    return
        rf.fetch(offset, out)

    def _span(self, rf: RangeFile, s: int, e: int) -> bytearray:
        key = (rf.url, s)
        with self.lock:
            data = self.held.get(key)
            if data is not None:
                self.held.move_to_end(key)
                return data
        data = bytearray(e - s)
        rf.fetch(s, memoryview(data))
        with self.lock:
            self.held[key] = data
            while len(self.held) > KEEP:
                self.held.popitem(last=False)
        return data
