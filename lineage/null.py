"""The permutation null of a covariance: what "related" is measured against.

Two unrelated matrices of one shape are alike in no element, but
they can share structure: a mean row (trained output heads move every
never-seen token's row the same way) or mean column. The structure-free
null of a correlation, 0 +- 1/sqrt(n), ignores that and is too narrow for
trained weights (the evaluation set measured an sd of 1.46 and |z| = 10 on
output heads of unrelated models). Instead z is measured against the
distribution of the covariance when the candidate's rows and columns are
shuffled independently: a matrix with the same row and column structure,
unrelated element by element. Writing each centered side as row effects +
column effects + interaction (sums of squares R, C, E), its mean is 0 and
its variance, in closed form, is

    R_s R_p / (rows - 1) + C_s C_p / (cols - 1) + E_s E_p / ((rows - 1)(cols - 1))

which needs only the row- and column-sum Grams the stats pass keeps (no
shuffles are drawn, no extra reads). With no structure it is the old
1/sqrt(n); with a dominant mean row it is about 1/sqrt(cols). Vectors
(cols = 1) keep the structure-free null; they never decide a verdict.
"""

from __future__ import annotations

import math

import numpy as np

from lineage.stats import Stats


def effects(st: Stats, u: np.ndarray) -> tuple[float, float, float]:
    """Sums of squares of the row effects, column effects and interaction of
    the centered matrix with coefficients `u` over the Y columns."""
    n, rows, cols = st.n, st.rows, st.cols
    t2 = float(u @ st.sums) ** 2 / n
    ss = max(float(u @ st.gram @ u) - t2, 0.0)
    r = min(max(float(u @ st.rowgram @ u) / cols - t2, 0.0), ss)
    c = min(max(float(u @ st.colgram @ u) / rows - t2, 0.0), ss - r)
    return r, c, max(ss - r - c, 0.0)


def null_sd(st: Stats, u: np.ndarray, v: np.ndarray) -> float:
    """Standard deviation of the covariance of `u` and `v` under the permutation null."""
    rows, cols = st.rows, st.cols
    ru, cu, eu = effects(st, u)
    rv, cv, ev = effects(st, v)
    if rows < 2 or cols < 2:  # a vector: no structure to keep
        return math.sqrt((ru + cu + eu) * (rv + cv + ev) / st.n)
    var = ru * rv / (rows - 1) + cu * cv / (cols - 1) + eu * ev / ((rows - 1) * (cols - 1))
    return math.sqrt(max(var, 0.0))
