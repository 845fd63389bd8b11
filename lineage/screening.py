"""Pool screening: of a large candidate pool, which candidates are worth a full fit.

A platform audits every upload against a pool of known bases; for most
uploads most of the pool is plainly unrelated, and fitting every candidate
against every tensor would read the whole pool for each. With a pool larger
than `screen_above`, a first pass reads a small fraction (`fraction`) of a
few large matrices per layer (the ROLES largest; a mixture of experts' routed
experts only where nothing else is left), of every suspect and every
candidate (batches of at most the kernel's candidate limit, each batch read
once for all the suspects that pair with it), and measures each candidate's
z against the permutation null as the full fit does. A candidate is kept
for the full fit when at least KEEP of its screened matrices reach Z_SIG,
the declared base always; if none is, the best one is kept so the verdict
still has rows to say `unrelated` with. The verdict lists the others under
`screened_out`, with their screening z.

Screening is deterministic (the same sampled rows every run), so a resumed
audit screens to the same candidates; the outcome is part of the audit's
fingerprint all the same.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from lineage.align import Group
from lineage.experts import experts_prefix
from lineage.explain.evidence import median
from lineage.explain.thresholds import Z_SIG
from lineage.fit import single

#: Fraction of screened candidates' matrices that must reach Z_SIG to keep a
#: candidate: half of RELATED_FRAC, so screening drops only what the full fit
#: would call unrelated, never a parent.
KEEP = 0.25
#: Matrices screened per layer: the largest roles.
ROLES = 2
#: Candidates per screening comparison (the kernel's limit).
BATCH = 8


@dataclass(frozen=True)
class Screening:
    """The `bulk.*` settings for screening."""

    screen_above: int = 4
    fraction: float = 0.02


def screening_groups(groups: list[Group]) -> list[Group]:
    """The comparisons of the screening pass: per suspect and layer the ROLES largest
    matrices, against every candidate in batches of BATCH."""
    by_layer: dict[tuple[str, int], list[Group]] = defaultdict(list)
    for g in groups:
        if g.status == "ok" and g.view is not None and len(g.shape) >= 2 and g.layer is not None:
            by_layer[(g.suspect, g.layer)].append(g)
    out: list[Group] = []
    for _, gs in sorted(by_layer.items()):
        # a routed expert's matrices last: renumbering the experts (explain/experts.py) would hide a
        # parent from a screening that compared only them, and a layer's attention cannot be renumbered
        for g in sorted(gs, key=lambda g: (experts_prefix(g.tensor) is not None, -g.view.nbytes, g.tensor))[:ROLES]:  # type: ignore[union-attr]
            paired = g.paired
            for lo in range(0, len(paired), BATCH):
                batch = tuple(paired[lo : lo + BATCH])
                out.append(Group(g.suspect, g.tensor, g.canonical, g.component, g.layer, g.shape, g.dtype, g.view, batch))
    return out


def outcome(groups: list[Group], results: dict[int, object], names: list[str], base: str | None) -> dict[str, dict]:
    """Per suspect: {"kept": [...], "candidates": {name: {matrices, median_z, frac_significant}}}.
    `results`: screening group index -> its ItemResult."""
    zs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for gid, g in enumerate(groups):
        res = results.get(gid)
        if res is None or getattr(res, "stats", None) is None:
            continue
        for side in g.paired:
            z = single(res.stats, side.candidate).z  # type: ignore[attr-defined]
            if z == z:  # not NaN
                zs[g.suspect][side.candidate].append(z)
    out = {}
    for suspect, per in zs.items():
        summary = {
            n: {
                "matrices": len(v),
                "median_z": round(median(v) or 0.0, 3),
                "frac_significant": round(sum(z >= Z_SIG for z in v) / len(v), 4),
            }
            for n, v in per.items()
        }
        kept = [n for n in names if n in summary and (summary[n]["frac_significant"] >= KEEP or n == base)]
        if not kept and summary:
            kept = [max(summary, key=lambda n: summary[n]["median_z"])]
        out[suspect] = {"kept": kept, "dropped": [n for n in names if n not in kept], "candidates": summary}
    return out


def screen(plan, out_dir, run_units, settings: Screening, unit_bytes: int, say=None) -> int:
    """Screen the pool when it is larger than `settings.screen_above`; narrow the plan to
    each suspect's kept candidates. The outcome is kept in OUTPUT_DIR/screening.json, and
    a rerun with the same models and settings reuses it (and needs no workers for it).
    Returns the bytes the screening pass read (0 when reused or not needed)."""
    import hashlib
    import json
    from pathlib import Path

    from lineage.files import MAX_INDEX_BYTES, read_small
    from lineage.output import atomic_write_bytes
    from lineage.plan import items_of, pack

    names = [c.name for c in plan.candidates]
    if len(names) <= settings.screen_above or not plan.suspects:
        return 0
    key = hashlib.sha256(f"{plan.fingerprint()}|{settings}".encode()).hexdigest()
    path = Path(out_dir) / "screening.json"
    stored = None
    if path.exists():
        try:
            stored = json.loads(read_small(path, MAX_INDEX_BYTES, "screening.json"))
        except Exception:  # noqa: BLE001 - an unreadable record is recomputed
            stored = None
    read = 0
    if isinstance(stored, dict) and stored.get("key") == key:
        result = stored["suspects"]
    else:
        groups = screening_groups(plan.groups)
        items = items_of(groups, 1 << 62, share=True, sample_fraction=settings.fraction)
        results: dict[int, object] = {}
        for _, rs in run_units(pack(items, unit_bytes)):
            for r in rs:
                if hasattr(r, "gid"):
                    results[r.gid] = r
                    read += r.read
        result = outcome(groups, results, names, plan.model_set.base)
        atomic_write_bytes(path, json.dumps({"key": key, "bytes_read": read, "suspects": result}, indent=1).encode())
    plan.screened = result
    plan.realign({s: o["kept"] for s, o in result.items()})
    if say is not None:
        for s, o in result.items():
            say(f"screening: {s} keeps {', '.join(o['kept'])} of {len(names)} candidates")
    return read
