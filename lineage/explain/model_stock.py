"""Model Stock (Jang et al. 2024, mergekit's `model_stock`): recognised by its own formula.

Model Stock averages N fine-tunes of one base and pulls the average back
toward the base by a ratio that is a function of the fine-tunes' geometry,
per tensor: s = t avg(p_i) + (1 - t) b, with t = N cos / (1 + (N - 1) cos)
and cos the mean pairwise cosine of the offsets p_i - b. So as a blend it
gives every fine-tune the same weight t / N and the base 1 - t, and that t
is predicted, matrix by matrix, from the candidates alone (their inner
products are in the stored statistics). A blend whose base weight matches
the prediction on the median matrix within MODEL_STOCK_TOL, with the
fine-tunes' weights equal, is `method: model_stock`, and its recipe is
mergekit's, which reruns exactly.
"""

from __future__ import annotations

import math

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_parents, extras, is_blend, tail
from lineage.explain.evidence import Evidence, median
from lineage.explain.thresholds import MODEL_STOCK_TOL
from lineage.fit import Forms


def stock_fit(ev: Evidence, base: str, others: list[str]) -> dict | None:
    """Median |fitted t - predicted t| and |fine-tune weight - t / N| over matrices, for `base`."""
    use = [base, *others]
    n = len(others)
    errs, uneven, ts = [], [], []
    for r, b in ev.refits(use, None):
        if r.ndim < 2:
            continue
        f = Forms(r.stats)  # type: ignore[arg-type]
        d = {o: f.diff(o, base) for o in others}
        norms = {o: math.sqrt(max(f.dot(d[o], d[o]), 0.0)) for o in others}
        cos = [
            max(-1.0, min(1.0, f.dot(d[a], d[c]) / max(norms[a] * norms[c], 1e-6)))
            for i, a in enumerate(others)
            for c in others[i + 1 :]
        ]
        mean_cos = sum(cos) / len(cos)
        den = 1 + (n - 1) * mean_cos
        predicted = 0.0 if abs(den) < 1e-6 else n * mean_cos / den
        fitted = 1.0 - (b.weights[base] or 0.0)
        errs.append(abs(fitted - predicted))
        uneven.append(max(abs((b.weights[o] or 0.0) - fitted / n) for o in others))
        ts.append(fitted)
    if not errs:
        return None
    return {
        "base": base,
        "matrices": len(errs),
        "median_t_error": median(errs),
        "median_uneven": median(uneven),
        "median_t": median(ts),
    }


class ModelStock(Explanation):
    name = "model_stock"

    def explain(self, ev: Evidence) -> dict | None:
        if not is_blend(ev) or len(ev.related) < 3:
            return None
        fits = []
        for base in ev.related:
            others = [n for n in ev.related if n != base]
            s = stock_fit(ev, base, others)
            if s is not None:
                fits.append(s)
        if not fits:
            return None
        best = min(fits, key=lambda s: s["median_t_error"])
        ev.analyses["model_stock"] = {**best, "criteria": {"max_median_t_error": MODEL_STOCK_TOL}}
        if best["median_t_error"] > MODEL_STOCK_TOL or best["median_uneven"] > MODEL_STOCK_TOL:
            return None
        b = best["base"]
        parents = [p for p in blend_parents(ev) if p["name"] != b]
        if len(parents) != len(ev.related) - 1:
            return None
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a Model Stock merge of {', '.join(p['name'] for p in parents)} on base {b}: every "
            f"fine-tune carries the same weight t / {len(parents)} and the base 1 - t, and t (median "
            f"{best['median_t']:.3f}) is what the formula N cos / (1 + (N - 1) cos) of the offsets' mean cosine "
            f"predicts, matrix by matrix, within {best['median_t_error']:.1e} on the median matrix." + tail(ev),
            method="model_stock",
            base=b,
            base_weight=round(1 - best["median_t"], 6),
            **extras(ev),
        )
