"""Per-tensor fits from `Stats`: each candidate alone, and the blend.

Single candidate: cosine, centered correlation (Pearson), relative distance
|s - p| / |s|, fraction of bit-equal elements, and z: the number of standard
deviations the covariance lies above its permutation null (lineage/null.py).

Blend: the suspect is fitted as an affine combination of the candidates,

    s - b = sum_i a_i (p_i - b)      (b = base, a candidate; w_b = 1 - sum a_i)

which is the base-relative ("delta space") fit of DESIGN.md. Related
parents are nearly collinear as raw vectors (a fine-tune and its base have
cosine ~0.999), so the unconstrained fit s = sum c_i p_i is ill-conditioned
(`raw_cond` reports by how much); their differences from a common base are
not. The affine weights do not depend on which candidate is the base; the
base only fixes what R^2 and `cos_fit` (cos of s - b with its fit) measure.

The residual is the last pivot of a Cholesky factorisation of the augmented
Gram [[A, g], [g', t't]] (the R of a QR of the augmented columns), built
from difference columns, not `t't - 2 a'g + a'Aa` on raw magnitudes.
Standard errors are ordinary least squares ones (residual variance times
(C'C)^-1): they measure how well the data pin the coefficient, and are what
separates a weight from rounding noise; the spread across tensors, reported
by the verdict, measures consistency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lineage.null import null_sd
from lineage.stats import Stats

#: Columns whose part independent of the others is below this fraction of
#: their norm are dropped from a blend (an alias or an unchanged tensor).
DEPENDENT = 1e-9


@dataclass
class Single:
    candidate: str
    cosine: float
    corr: float
    rel_dist: float
    exact_frac: float
    z: float


@dataclass
class Blend:
    base: str
    weights: dict[str, float | None]  # None: dropped as collinear
    se: dict[str, float | None]
    residual_rel: float  # |s - fit| / |s|
    r2: float  # of s - b
    cos_fit: float
    cond: float
    raw_cond: float


class Forms:
    """Inner products of the vectors behind a Stats, as quadratic forms."""

    def __init__(self, st: Stats) -> None:
        self.st = st
        self.g = st.gram
        self.m = len(st.order) + 1

    def vec(self, who: str) -> np.ndarray:
        """Coefficients over the Y columns of the suspect or a candidate."""
        v = np.zeros(self.m)
        v[0] = 1.0
        if who == "suspect":
            v[self.m - 1] = 1.0
        else:
            i = self.st.order.index(who)
            if i:
                v[i] = 1.0
        return v

    def diff(self, a: str, b: str) -> np.ndarray:
        """Coefficients of a - b; only difference columns, never the reference."""
        v = self.vec(a) - self.vec(b)
        v[0] = 0.0
        return v

    def dot(self, u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ self.g @ v)

    def total(self, u: np.ndarray) -> float:
        return float(u @ self.st.sums)


def single(st: Stats, cand: str) -> Single:
    f = Forms(st)
    n = st.n
    s, p = f.vec("suspect"), f.vec(cand)
    ss, pp, sp = f.dot(s, s), f.dot(p, p), f.dot(s, p)
    d = f.diff("suspect", cand)
    dd = max(f.dot(d, d), 0.0)
    ms, mp = f.total(s) / n, f.total(p) / n
    var_s, var_p = ss - n * ms * ms, pp - n * mp * mp
    cov = sp - n * ms * mp
    cos = sp / math.sqrt(ss * pp) if ss > 0 and pp > 0 else float("nan")
    corr = cov / math.sqrt(var_s * var_p) if var_s > 0 and var_p > 0 else float("nan")
    rel = math.sqrt(dd / ss) if ss > 0 else (0.0 if dd == 0 else float("inf"))
    exact = st.exact[st.order.index(cand)] / n
    sd = null_sd(st, s, p)
    z = cov / sd if sd > 0 and not math.isnan(corr) else float("nan")
    return Single(cand, _clip(cos), _clip(corr), rel, exact, z)


def _clip(x: float) -> float:
    return x if math.isnan(x) else max(-1.0, min(1.0, x))


def choose_base(st: Stats, use: list[str]) -> str:
    """The medoid of the candidates; on a tie the one farther from the suspect.

    In a family (a base and its fine-tunes) the base is the candidate closest
    to all the others. With two candidates the medoid is a tie, and the one
    the suspect is farther from is taken, so the larger delta is fitted.
    """
    f = Forms(st)

    def d2(a: str, b: str) -> float:
        v = f.diff(a, b)
        return max(f.dot(v, v), 0.0)

    spread = {c: sum(d2(c, o) for o in use if o != c) for c in use}
    lo = min(spread.values())
    tied = [c for c in use if spread[c] <= lo * (1 + 1e-9)]
    return max(tied, key=lambda c: (d2("suspect", c), -use.index(c)))


def blend(st: Stats, use: list[str] | None = None, base: str | None = None, free: bool = False) -> Blend | None:
    """Affine fit of the suspect on candidates `use` (default all) around `base`.

    With `free`, the weights need not sum to 1: the base vector itself is one more column
    (s - b = e b + sum_i c_i (p_i - b), as `interpolation` fits two parents), which is how a
    linear merge whose weights were not normalised (mergekit's `normalize: false`) is fitted;
    the base's weight is then 1 + e - sum_i c_i."""
    use = list(use or st.order)
    if len(use) < 2 or st.n == 0:
        return None
    base = base if base in use else choose_base(st, use)
    f = Forms(st)
    others = [c for c in use if c != base]
    cols = [f.diff(c, base) for c in others]
    t = f.diff("suspect", base)
    kept: list[int] = []
    for i, c in enumerate(cols):
        if _independent(f, [cols[j] for j in kept], c):
            kept.append(i)
    s = f.vec("suspect")
    ss = f.dot(s, s)
    tt = max(f.dot(t, t), 0.0)
    weights: dict[str, float | None] = {c: None for c in others}
    se: dict[str, float | None] = {c: None for c in others}
    if not kept:
        weights[base], se[base] = 1.0, 0.0
        return Blend(base, weights, se, math.sqrt(tt / ss) if ss > 0 else 0.0, 0.0, 0.0, float("inf"), _raw_cond(f, use))
    C = np.stack([f.vec(base)] * free + [cols[i] for i in kept], axis=1)  # m x q
    A = C.T @ f.g @ C
    g = C.T @ f.g @ t
    q = len(kept) + free
    aug = np.zeros((q + 1, q + 1))
    aug[:q, :q], aug[:q, q], aug[q, :q], aug[q, q] = A, g, g, tt
    dscale = np.sqrt(np.maximum(np.diagonal(aug), 1e-300))
    a = np.linalg.solve(A, g)
    try:
        L = np.linalg.cholesky(aug / np.outer(dscale, dscale))
        rss = float((L[q, q] * dscale[q]) ** 2)
    except np.linalg.LinAlgError:  # exact fit: the augmented matrix is singular
        rss = max(tt - float(g @ a), 0.0)
    dof = max(st.n - q, 1)
    cov = (rss / dof) * np.linalg.inv(A)
    for j, i in enumerate(kept):
        weights[others[i]] = float(a[j + free])
        se[others[i]] = math.sqrt(max(float(cov[j + free, j + free]), 0.0))
    # the base's weight, 1 (+ e) - sum_i c_i, and its variance through the same linear form
    u = np.array([1.0] * free + [-1.0] * len(kept))
    weights[base] = 1.0 + float(u @ a)
    se[base] = math.sqrt(max(float(u @ cov @ u), 0.0))
    r2 = 1.0 - rss / tt if tt > 0 else 0.0
    return Blend(
        base=base,
        weights=weights,
        se=se,
        residual_rel=math.sqrt(rss / ss) if ss > 0 else 0.0,
        r2=r2,
        cos_fit=math.sqrt(max(r2, 0.0)),
        cond=_cond(A),
        raw_cond=_raw_cond(f, use),
    )


def _independent(f: Forms, kept: list[np.ndarray], c: np.ndarray) -> bool:
    cc = f.dot(c, c)
    if cc <= 0:
        return False
    if not kept:
        return True
    K = np.stack(kept, axis=1)
    A = K.T @ f.g @ K
    g = K.T @ f.g @ c
    resid = cc - float(g @ np.linalg.solve(A, g))
    return resid > DEPENDENT * cc


def _cond(A: np.ndarray) -> float:
    d = np.sqrt(np.maximum(np.diagonal(A), 1e-300))
    ev = np.linalg.eigvalsh(A / np.outer(d, d))
    return float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")


def _raw_cond(f: Forms, use: list[str]) -> float:
    """Condition number of the unconstrained fit on raw candidate vectors."""
    P = np.stack([f.vec(c) for c in use], axis=1)
    return _cond(P.T @ f.g @ P)


@dataclass
class Interpolation:
    """The suspect as c_a a + c_b b with free coefficients (no affine constraint).

    Linear interpolation has c_a + c_b = 1. Spherical interpolation (slerp)
    of vectors an angle theta apart has c_a = sin((1 - t) theta) / sin theta
    and c_b = sin(t theta) / sin theta, whose sum exceeds 1 by `predicted`
    (for this t and theta): about t (1 - t) theta^2 / 2, so the two coincide
    for parents a few degrees apart, and differ plainly for distant ones.
    """

    excess: float  # c_a + c_b - 1
    se: float  # its OLS standard error
    c_b: float
    theta: float  # angle between the raw parents, radians
    t: float  # slerp parameter toward b that gives c_b at this angle
    predicted: float  # excess a slerp at t would have


def interpolation(st: Stats, a: str, b: str) -> Interpolation | None:
    """Fit s - a = e a + c_b (b - a): e is the excess over linear interpolation,
    estimated on difference columns (well conditioned even for parents at
    cosine 0.999, where the raw 2x2 system is not)."""
    f = Forms(st)
    A, d, t_ = f.vec(a), f.diff(b, a), f.diff("suspect", a)
    C = np.stack([A, d], axis=1)
    G = C.T @ f.g @ C
    g = C.T @ f.g @ t_
    if st.n < 3 or float(np.linalg.det(G)) <= 0:
        return None
    coef = np.linalg.solve(G, g)
    rss = max(f.dot(t_, t_) - float(g @ coef), 0.0)
    cov = rss / (st.n - 2) * np.linalg.inv(G)
    e, c_b = float(coef[0]), float(coef[1])
    B = f.vec(b)
    aa, bb = f.dot(A, A), f.dot(B, B)
    ab = aa + f.dot(A, d)  # a.b = a.a + a.(b - a)
    theta = math.acos(max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))) if aa > 0 and bb > 0 else 0.0
    if theta > 1e-6:
        # s = c_a a + c_b b with c_a = sin((1-t) theta) / sin theta, c_b = sin(t theta) / sin theta, so
        # cos(t theta) = c_a + c_b cos theta and sin(t theta) = c_b sin theta: atan2 of the two is
        # well conditioned for every t (asin of the second alone is not near t theta = 90 degrees).
        c_a = 1.0 + e - c_b
        t = math.atan2(c_b * math.sin(theta), c_a + c_b * math.cos(theta)) / theta
        predicted = (math.sin((1 - t) * theta) + math.sin(t * theta)) / math.sin(theta) - 1
    else:
        t, predicted = c_b, 0.0
    return Interpolation(e, math.sqrt(max(float(cov[0, 0]), 0.0)), c_b, theta, t, predicted)
