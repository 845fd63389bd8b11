"""Everything the explanations of one suspect look at, computed once.

On top of the suspect's rows (explain/table.py), `Evidence` computes, once
and lazily, what several explanations share: coverage, the per-candidate
summaries (median correlation and z, fraction of significant matrices),
the groups of identical candidates, which candidates are related, and the
blend refits over any set of candidates. Analyses that explanations run on
it (the blend fit, the sparse-merge family, the interpolation test) are
recorded in `analyses` and reported in the verdict's `evidence` section.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from lineage.dtypes import rounding_tolerance
from lineage.explain.table import Cand, Row, load_rows
from lineage.explain.thresholds import IDENTICAL_COVERAGE, NULL, RELATED_FRAC, Z_SIG
from lineage.fit import Blend, Forms, blend


@dataclass(frozen=True)
class Candidate:
    name: str
    base: bool = False


def median(xs) -> float | None:
    """Median of the values that are numbers (None and NaN skipped); None if there are none."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def weighted(values: list[tuple[float, float | None, float]]) -> dict:
    """(value, se, weight) triples -> mean, sd across tensors, 95% interval.

    The interval combines the spread across tensors (over the effective
    number of tensors) with the pooled per-tensor standard errors."""
    W = sum(w for _, _, w in values)
    mean = sum(v * w for v, _, w in values) / W
    var = sum(w * (v - mean) ** 2 for v, _, w in values) / W
    t_eff = W * W / sum(w * w for _, _, w in values)
    se_pooled2 = sum((w * (se or 0.0)) ** 2 for _, se, w in values) / (W * W)
    half = 1.96 * math.sqrt(var / t_eff + se_pooled2)
    return {"mean": mean, "sd": math.sqrt(var), "ci95": [mean - half, mean + half], "tensors": len(values)}


@dataclass
class Summary:
    """How one candidate compares with the suspect, over all compared tensors."""

    tensors: int
    matrices: int
    coverage: float
    median_corr: float | None
    median_rel_dist: float | None
    median_near_frac: float | None
    median_z: float | None
    frac_significant: float
    stouffer_z: float | None
    identical: bool

    def public(self) -> dict:
        """The fields the verdict's evidence section reports."""
        return {
            "tensors": self.tensors,
            "matrices": self.matrices,
            "coverage": self.coverage,
            "median_corr": self.median_corr,
            "median_rel_dist": self.median_rel_dist,
            "median_near_frac": self.median_near_frac,
            "median_z": self.median_z,
            "frac_significant": self.frac_significant,
            "stouffer_z": self.stouffer_z,
        }


@dataclass
class Evidence:
    suspect: str
    candidates: list[Candidate]
    rows: list[Row]
    unmatched: dict[str, int] = field(default_factory=dict)
    #: the resolved models (suspect and candidates, by name): refiners plan byte reads from their headers
    models: dict = field(default_factory=dict)
    #: analyses computed so far (blend, sparse, interpolation): the verdict reports them
    analyses: dict = field(default_factory=dict)
    #: what could not be looked at, and why (reported in the verdict's `warnings`)
    warnings: list[str] = field(default_factory=list)
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        out_dir: Path,
        suspect: str,
        candidates: list[Candidate],
        unmatched: dict[str, int] | None = None,
        models: dict | None = None,
    ) -> Evidence:
        return cls(suspect, candidates, load_rows(Path(out_dir), suspect), dict(unmatched or {}), dict(models or {}))

    # -- the rows ----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    @property
    def declared(self) -> str | None:
        return next((c.name for c in self.candidates if c.base), None)

    @cached_property
    def ok(self) -> list[Row]:
        return [r for r in self.rows if r.status == "ok"]

    @cached_property
    def matrices(self) -> list[Row]:
        """Compared rows of 2-D (or higher) tensors: what decides (1-D never does)."""
        return [r for r in self.ok if r.ndim >= 2]

    @cached_property
    def entries(self) -> dict[str, list[tuple[Row, Cand]]]:
        """Per candidate, the compared rows and its result on each."""
        out: dict[str, list[tuple[Row, Cand]]] = defaultdict(list)
        for r in self.ok:
            for c in r.cands:
                if c.status == "ok":
                    out[c.candidate].append((r, c))
        return out

    @cached_property
    def float_elements(self) -> int:
        """Elements of the suspect's weights (integer tensors are not weights)."""
        return sum(r.numel for r in self.rows if not (r.status == "skipped" and r.reason.endswith("is not a weight"))) or 1

    @cached_property
    def skipped(self) -> Counter:
        return Counter(f"{r.status}: {short_reason(r.reason)}" for r in self.rows if r.status != "ok")

    @cached_property
    def coverage(self) -> dict:
        ok = self.ok
        return {
            "tensors": len(self.rows),
            "tensors_compared": len(ok),
            "bytes_compared": sum(r.bytes_read for r in ok),
            "elements_compared_frac": round(sum(r.numel for r in ok) / self.float_elements, 6),
            "skipped": dict(self.skipped),
            "candidate_tensors_unmatched": dict(self.unmatched),
        }

    # -- per candidate -----------------------------------------------------------------

    @cached_property
    def per(self) -> dict[str, Summary]:
        out = {}
        for n in self.names:
            es = self.entries.get(n, [])
            mats = [(r, c) for r, c in es if r.ndim >= 2]
            zs = [c.z for _, c in mats if c.z is not None]
            within = [c.rel_dist is not None and c.rel_dist <= c.rounding_tol for _, c in es if c.rounding_tol is not None]
            cov = sum(r.numel for r, _ in es) / self.float_elements
            out[n] = Summary(
                tensors=len(es),
                matrices=len(mats),
                coverage=round(cov, 6),
                median_corr=median(c.corr for _, c in mats),
                median_rel_dist=median(c.rel_dist for _, c in es),
                median_near_frac=median(c.near_frac for _, c in mats),
                median_z=median(zs),
                frac_significant=(sum(z >= Z_SIG for z in zs) / len(zs)) if zs else 0.0,
                stouffer_z=(sum(zs) / math.sqrt(len(zs))) if zs else None,
                identical=bool(es) and all(within) and len(within) == len(es) and cov >= IDENTICAL_COVERAGE,
            )
        return out

    @cached_property
    def alias_of(self) -> dict[str, str]:
        """Each candidate's representative among the candidates identical to it."""
        names, declared = self.names, self.declared
        rep = {n: n for n in names}

        def find(x: str) -> str:
            while rep[x] != x:
                x = rep[x]
            return x

        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = same = 0
                for r in self.ok:
                    if a not in r.order or b not in r.order:
                        continue
                    dt = {c.candidate: c.dtype for c in r.cands}
                    f = Forms(r.stats)  # type: ignore[arg-type]
                    d = f.diff(a, b)
                    pa_ = f.vec(a)
                    rel = math.sqrt(max(f.dot(d, d), 0.0) / max(f.dot(pa_, pa_), 1e-300))
                    tol = rounding_tolerance(dt[a], dt[b]) or 0.0
                    shared += 1
                    same += rel <= tol
                if shared and same == shared:
                    ra, rb = find(a), find(b)
                    keep = min((ra, rb), key=lambda n: (n != declared, names.index(n)))
                    rep[ra if keep == rb else rb] = keep
        return {n: find(n) for n in names}

    @cached_property
    def aliases(self) -> dict[str, list[str]]:
        """Representative -> the other candidates identical to it."""
        groups: dict[str, list[str]] = defaultdict(list)
        for n in self.names:
            if self.alias_of[n] != n:
                groups[self.alias_of[n]].append(n)
        return dict(groups)

    @cached_property
    def reps(self) -> list[str]:
        return [n for n in self.names if self.alias_of[n] == n]

    @cached_property
    def related(self) -> list[str]:
        """Representatives that at least half of the suspect's matrices correlate with significantly."""
        return [n for n in self.reps if self.per[n].matrices and self.per[n].frac_significant >= RELATED_FRAC]

    @cached_property
    def closest(self) -> str:
        return max(self.names, key=lambda n: self.per[n].median_corr if self.per[n].median_corr is not None else -2.0)

    def evidence_section(self) -> dict:
        return {
            "null": NULL,
            "z_threshold": Z_SIG,
            "candidates": {n: self.per[n].public() for n in self.names},
            **self.analyses,
        }

    # -- fits shared by several explanations -------------------------------------------

    @property
    def free_weights(self) -> bool:
        """Whether the suspect's blend was fitted with weights free to sum away from 1 (blendfit.py):
        the breakdowns and the residual then read that fit too."""
        return "weights_sum" in (self.analyses.get("blend") or {})

    def refits(self, use: list[str], base: str | None, free: bool = False) -> list[tuple[Row, Blend]]:
        """(row, blend over `use`) for every compared row that holds all of `use` (`free`: weights
        not constrained to sum to 1, fit.blend)."""

        def compute() -> list[tuple[Row, Blend]]:
            out = []
            for r in self.ok:
                if not set(use) <= set(r.order):
                    continue
                b = blend(r.stats, use=use, base=base, free=free)  # type: ignore[arg-type]
                if b is not None and all(b.weights[n] is not None for n in use):
                    out.append((r, b))
            return out

        return self.memo(("refits", tuple(use), base, free), compute)

    def memo(self, key: object, compute: Callable[[], Any]) -> Any:
        """An analysis computed once per suspect, whoever asks first."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def short_reason(reason: str) -> str:
    """A reason's category for counting: no file, tensor, or numbers."""
    if "]: " in reason:
        reason = reason.split("]: ", 1)[1]
    return re.sub(r"\b\d+\b", "N", reason.split(": ")[0])[:80]
