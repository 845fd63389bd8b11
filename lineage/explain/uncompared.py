"""Nothing compared: no tensor of the suspect met a candidate tensor (inconclusive)."""

from __future__ import annotations

from lineage.explain.base import Explanation, document
from lineage.explain.evidence import Evidence


class Uncompared(Explanation):
    name = "uncompared"

    def explain(self, ev: Evidence) -> dict | None:
        if ev.ok:
            return None
        top = ", ".join(f"{k} x{v}" for k, v in ev.skipped.most_common(3))
        return document(ev, "inconclusive", [], f"No tensor of {ev.suspect} could be compared with any candidate ({top}).")
