"""Slerp: spherical interpolation of two parents, told from linear interpolation.

Two parents are also fitted with free coefficients, s = c_a a + c_b b
(fit.interpolation, per matrix). Linear interpolation sums them to 1; a
slerp at t between vectors an angle theta apart sums them to
(sin((1 - t) theta) + sin(t theta)) / sin(theta), more than 1 by about
t (1 - t) theta^2 / 2. A sum above 1 by what the angle predicts, far above
its noise, is a slerp, reported with t (from the heavier parent toward the
lighter: the endpoint mergekit calls base cannot be recovered). Parents a
few degrees apart (fine-tunes of one base) cannot be told apart this way,
and mergekit itself interpolates them linearly below 1.8 degrees: those
are linear (linear.py says why).
"""

from __future__ import annotations

import math

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_parents, is_blend, within
from lineage.explain.evidence import Evidence, median, weighted
from lineage.explain.schedule import describe, schedule
from lineage.explain.thresholds import MAX_WITHIN_SD, SLERP_MIN_SE, SLERP_RATIO, Z_SIG
from lineage.fit import Interpolation
from lineage.fit import interpolation as fit_interpolation


def interpolation(ev: Evidence, a: str, b: str) -> dict | None:
    """The interpolation test between parents a and b (once per suspect and pair)."""
    return ev.memo(("interpolation", a, b), lambda: _interpolation(ev, a, b))


def _interpolation(ev: Evidence, a: str, b: str) -> dict | None:
    """Linear or spherical interpolation between two parents (fit.interpolation per matrix).

    Slerp when the free coefficients sum to more than 1 significantly
    (Stouffer z >= Z_SIG), by what a slerp at the fitted t and the
    parents' angle predicts (median ratio within [0.5, 2]), and that
    prediction is far above the noise (>= 3 standard errors): parents a
    few degrees apart cannot be told apart, and are reported as linear
    with the same weights."""
    fits: list[tuple[Interpolation, float]] = []
    points = []
    for r in ev.matrices:
        if not {a, b} <= set(r.order):
            continue
        it = fit_interpolation(r.stats, a, b)  # type: ignore[arg-type]
        if it is not None and it.se > 0:
            fits.append((it, float(r.numel)))
            points.append((r.layer, r.component, it.t, it.se, float(r.numel)))
    out = None
    if fits:
        z = sum(it.excess / it.se for it, _ in fits) / math.sqrt(len(fits))
        ratio = median([it.excess / it.predicted for it, _ in fits if it.predicted > 0])
        pred, se = median([it.predicted for it, _ in fits]), median([it.se for it, _ in fits])
        t = weighted([(it.t, it.se, w) for it, w in fits])
        is_slerp = (
            z >= Z_SIG
            and ratio is not None
            and SLERP_RATIO[0] <= ratio <= SLERP_RATIO[1]
            and pred is not None
            and pred >= SLERP_MIN_SE * (se or 0)
        )
        out = {
            "is_slerp": is_slerp,
            "matrices": len(fits),
            "median_excess": median([it.excess for it, _ in fits]),
            "median_se": se,
            "z": z,
            "median_predicted_excess": pred,
            "median_excess_over_predicted": ratio,
            "median_theta_deg": math.degrees(median([it.theta for it, _ in fits]) or 0.0),
            "t": {k: t[k] for k in ("mean", "ci95", "sd")},
            "toward": b,
            "t_schedule": schedule(points, 1 + max((r.layer for r in ev.rows if r.layer is not None), default=0)),
        }
        ev.analyses["interpolation"] = out
    return out


class Slerp(Explanation):
    name = "slerp"

    def explain(self, ev: Evidence) -> dict | None:
        if not is_blend(ev):
            return None
        parents = blend_parents(ev)
        if len(parents) != 2:
            return None
        a, b = parents[0]["name"], parents[1]["name"]
        interp = interpolation(ev, a, b)
        if interp is None or not interp["is_slerp"]:
            return None
        t, ts = interp["t"], interp["t_schedule"]
        if ts["kind"] != "constant" and (ts["within_sd"] or 0.0) <= MAX_WITHIN_SD:
            t = within(t | {"tensors": interp["matrices"]}, ts)
        slerp_parents = [
            {**parents[0], "weight": round(1 - t["mean"], 6), "ci95": [round(1 - x, 6) for x in t["ci95"][::-1]]},
            {**parents[1], "weight": round(t["mean"], 6), "ci95": [round(x, 6) for x in t["ci95"]]},
        ]
        for p in slerp_parents:
            p.pop("sd_across_tensors", None)
            p.pop("sd_within_groups", None)
        return document(
            ev,
            "blend",
            slerp_parents,
            f"{ev.suspect} is a spherical interpolation (slerp) from {a} toward {b} at t = {t['mean']:.3f} "
            f"(95% interval [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]): the parents are "
            f"{interp['median_theta_deg']:.0f} degrees apart, and its free coefficients on them sum to "
            f"1 + {interp['median_excess']:.4f} (z {interp['z']:.0f} against 1), the "
            f"{interp['median_predicted_excess']:.4f} a slerp at that t and angle has, where a linear blend "
            "sums to exactly 1. The weights are 1 - t and t"
            + ("." if ts["kind"] == "constant" else f"; t follows a schedule: {describe('t', ts)}."),
            method="slerp",
            t=round(t["mean"], 6),
            slerp={
                "from": a,
                "toward": b,
                "t": round(t["mean"], 6),
                "ci95": [round(x, 6) for x in t["ci95"]],
                "t_schedule": ts,
            },
            schedule={b: ts, a: flipped(ts)},
            base=a,
        )


def flipped(s: dict) -> dict:
    """The schedule of 1 - t (the other parent's weight)."""

    def one(x: float | None) -> float | None:
        return None if x is None else round(1.0 - x, 4)

    out = {**s, "anchors": [one(x) for x in s["anchors"]] if s.get("anchors") else s.get("anchors")}
    out["per_layer"] = {c: {i: one(v) for i, v in layers.items()} for c, layers in s["per_layer"].items()}
    out["outside_stack"] = {c: one(v) for c, v in s["outside_stack"].items()}
    out["components"] = {
        c: {**p, "anchors": [one(x) for x in p["anchors"]] if p.get("anchors") else p.get("anchors")}
        for c, p in s.get("components", {}).items()
    }
    return out
