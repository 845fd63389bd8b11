"""Explanations of a suspect: one small unit per way of explaining it, in one registry.

`REGISTRY` states the precedence in one place. Explanations are tried in
order until one answers (a copy is identical before it is anything else; a
layer stack before a blend; a suspect no candidate relates to is settled
before any blend is fitted; among blends the most specific signature wins:
sparse, then a merge trained afterwards, then Model Stock, then task
arithmetic, then slerp, then linear; derived is what a
related suspect is when no blend explains it). Refiners then amend that
answer: for a DARE merge, how it scaled the deltas it kept and whether it
elected their signs (explain/consensus.py), then a layer map, then a mixture of experts' experts renumbered and its
routers shifted (explain/experts.py), then undone permutations, then a
residual stream permuted or rotated (explain/gauge.py; renumbered experts
matched in its gauge) and, in that gauge, permutations again, then per-head
and per-unit disguises seen through their invariant products
(explain/invariants.py); last, a derived suspect that sits between its
candidates is given no parent (explain/siblings.py).

Adding a way of explaining a suspect: one file with an `Explanation`
subclass (see base.py), and one line here.

`decide` is a generator, so that the steps that need tensor bytes can ask
for them without reading them: it yields lists of work items, the caller
runs them (on Ray, or in-process for tests) and sends back their results
in the same order, and it returns the verdict document.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from lineage.explain.base import Explainer
from lineage.explain.consensus import KeptDeltas
from lineage.explain.derived import Derived
from lineage.explain.evidence import Candidate, Evidence
from lineage.explain.experts import ExpertMatching, ExpertMatchingInGauge, ExpertRefit, RouterShift
from lineage.explain.gauge import GaugeEstimate, GaugeRefit
from lineage.explain.identical import Identical
from lineage.explain.invariants import Invariants
from lineage.explain.layermap import LayerMap
from lineage.explain.linear import Linear
from lineage.explain.model_stock import ModelStock
from lineage.explain.passthrough import Passthrough
from lineage.explain.permutation import Permutations, PermutationsInGauge
from lineage.explain.siblings import Siblings
from lineage.explain.slerp import Slerp
from lineage.explain.sparse import Sparse
from lineage.explain.task_arithmetic import TaskArithmetic
from lineage.explain.trained import TrainedMerge
from lineage.explain.uncompared import Uncompared
from lineage.explain.unrelated import Unrelated

REGISTRY: tuple[Explainer, ...] = (
    Uncompared(),
    Identical(),
    Passthrough(),
    Unrelated(),
    Sparse(),
    TrainedMerge(),
    ModelStock(),
    TaskArithmetic(),
    Slerp(),
    Linear(),
    Derived(),
    # refiners, on the answer above
    KeptDeltas(),
    LayerMap(),
    ExpertMatching(),
    ExpertRefit(),
    RouterShift(),
    Permutations(),
    GaugeEstimate(),
    ExpertMatchingInGauge(),
    GaugeRefit(),
    PermutationsInGauge(),
    Invariants(),
    Siblings(),
)

__all__ = ["REGISTRY", "Candidate", "Evidence", "decide", "decide_with"]


def decide(ev: Evidence) -> Generator[list, list, dict]:
    """The verdict document of `ev`; yields the work items a step needs, receives their results."""
    verdict: dict | None = None
    for step in REGISTRY:
        if (verdict is None) == step.refines:
            continue
        items = step.requests(ev, verdict)
        results = (yield items) if items else []
        out = step.apply(ev, verdict, results)
        if out is not None:
            verdict = out
    assert verdict is not None, "Derived answers whenever a candidate is related, Unrelated otherwise"
    return verdict


def decide_with(ev: Evidence, run: Callable[[list], list]) -> dict:
    """`decide`, running each batch of work items with `run` (items -> results, in order)."""
    gen = decide(ev)
    try:
        items = next(gen)
        while True:
            items = gen.send(run(items))
    except StopIteration as stop:
        return stop.value
