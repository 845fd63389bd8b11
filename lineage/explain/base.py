"""What an explanation is, and the verdict document every explanation writes.

An `Explainer` looks at a suspect's `Evidence` (and at the verdict so far)
and either answers with a verdict document or passes. Explanations proper
(identical, blend of some kind, derived, ...) are tried in the registry's
order until one answers; refiners (layer maps, undone permutations) come
after and amend that answer. A step that needs tensor bytes (a refiner
reading sampled rows of other layers) names them in `requests`: work items
the driver runs on Ray like every fit, whose results come back to `apply`.
The library never reads tensor bytes itself to decide.
"""

from __future__ import annotations

from typing import Protocol

from lineage.explain.breakdown import components
from lineage.explain.evidence import Evidence

SCHEMA_VERSION = 1


class Explainer(Protocol):
    #: A short name, for the registry and messages.
    name: str
    #: False: an explanation, tried while no verdict exists. True: a refiner,
    #: run on the verdict an explanation gave.
    refines: bool

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        """Work items (plan.Item and the like) whose results `apply` needs; [] for none."""
        ...

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        """The verdict document, a refined one, or None to pass."""
        ...


class Explanation:
    """Base of the explanations proper: no bytes needed, answer or pass."""

    name = ""
    refines = False

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        return []

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        return self.explain(ev)

    def explain(self, ev: Evidence) -> dict | None:
        raise NotImplementedError


def document(ev: Evidence, verdict: str, parents: list[dict], explanation: str, **extra: object) -> dict:
    """The verdict JSON (DESIGN.md's contract), with its breakdown by component and layer."""
    comps, layers = components(ev, parents)
    d = {
        "schema_version": SCHEMA_VERSION,
        "suspect": ev.suspect,
        "verdict": verdict,
        "parents": parents,
        "closest": ev.closest,
        "coverage": ev.coverage,
        "components": comps,
        "evidence": ev.evidence_section(),
        "explanation": explanation,
    }
    if layers:
        d["layers"] = layers
    if ev.aliases:
        d["aliases"] = dict(ev.aliases)
    d.update(extra)
    return d


def one_parent(ev: Evidence, name: str) -> list[dict]:
    """`parents` of an identical or derived verdict: the one parent, weight 1, with its aliases."""
    p: dict = {"name": name, "weight": 1.0, "ci95": [1.0, 1.0]}
    if ev.aliases.get(name):
        p["aliases"] = ev.aliases[name]
    return [p]


def unreadable(suspect: str, error: str) -> dict:
    """The verdict of a suspect whose files could not be opened."""
    return {
        "schema_version": SCHEMA_VERSION,
        "suspect": suspect,
        "verdict": "inconclusive",
        "parents": [],
        "closest": None,
        "coverage": {"tensors": 0, "tensors_compared": 0, "bytes_compared": 0, "skipped": {}},
        "components": {},
        "error": error,
        "explanation": f"{suspect} could not be audited: {error}",
    }
