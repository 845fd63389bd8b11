"""Tensor naming conventions as tables: prefixes, expert layouts, components.

Checkpoints of one family spell the same weight differently
(`model.language_model.layers.0...`, `language_model.model.layers.0...`,
`model.layers.0...`) and store routed experts either FUSED, one 3-D tensor
per projection and layer, or PER EXPERT, one 2-D tensor per expert. Both are
described here as data so a new convention is a table row, not a branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Stripped (first match only, longest first) to get a canonical name.
PREFIXES: tuple[str, ...] = (
    "model.language_model.",
    "language_model.model.",
    "language_model.",
    "model.",
    "bert.",
    "transformer.",
)

#: FP8 block-scale companions: `<weight name><suffix>` holds the scales.
SCALE_SUFFIXES: tuple[str, ...] = ("_scale_inv",)
FP8_BLOCK = 128

#: Per-expert spellings: regex -> (group prefix, expert index, projection role).
#: `w1`/`w3`/`w2` are Mixtral's names for gate/up/down.
PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
PROJ_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

#: Fused spellings: name suffix -> the per-expert projections stacked along
#: the rows of each expert's slice, in order. `gate_up_proj` [E, 2I, H]
#: holds gate rows then up rows; `down_proj` [E, H, I] one matrix per expert.
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
FUSED_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")

#: Component of a tensor: first matching rule wins. Norms come before
#: attention because `self_attn.q_norm` is a norm; routers before experts.
COMPONENT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(norm|LayerNorm|layernorm|\bln_?\w*)(\.|$)")),
    ("embedding", re.compile(r"(embed_tokens|embeddings|\bwte\b|\bwpe\b|tok_embeddings)")),
    ("head", re.compile(r"(^lm_head|^output\.weight|\bpooler\b|\bclassifier\b|^score\.)")),
    ("router", re.compile(r"(\.mlp\.gate\.|\.router\.|shared_expert_gate|\.gate\.weight$)")),
    ("expert", re.compile(r"\.experts\.")),
    ("attention", re.compile(r"(attn|attention|\.q_proj|\.k_proj|\.v_proj|\.o_proj)")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|intermediate|\.output\.dense|shared_expert)")),
)
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def canonical(name: str) -> str:
    """Name with the first known container prefix removed."""
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def component(name: str) -> str:
    c = canonical(name)
    for label, rule in COMPONENT_RULES:
        if rule.search(c):
            return label
    return "other"


def layer_index(name: str) -> int | None:
    """Index in the main decoder/encoder stack; None for MTP, vision and globals."""
    c = canonical(name)
    if c.startswith(("mtp.", "visual.", "vision")):
        return None
    m = LAYER_RE.search(c)
    return int(m.group(1)) if m else None


def role(name: str) -> str:
    """The canonical name with the stack index as '*': the same matrix in every layer."""
    c = canonical(name)
    m = LAYER_RE.search(c)
    return c if m is None else c[: m.start(1)] + "*" + c[m.end(1) :]


def layer_prefix(name: str) -> str | None:
    """The canonical name up to the stack index ('layers.3'), None outside the stack."""
    c = canonical(name)
    m = LAYER_RE.search(c)
    return None if m is None else c[: m.end(1)]


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIXES)


@dataclass(frozen=True)
class ExpertKey:
    prefix: str  # canonical, e.g. "layers.3.mlp.experts"
    expert: int
    proj: str  # gate_proj | up_proj | down_proj


def per_expert_key(name: str) -> ExpertKey | None:
    m = PER_EXPERT.match(canonical(name))
    if not m:
        return None
    proj = PROJ_ALIASES.get(m["proj"], m["proj"])
    return ExpertKey(m["prefix"], int(m["expert"]), proj)


def fused_key(name: str) -> tuple[str, str] | None:
    """(canonical experts prefix, fused kind) for a fused expert tensor."""
    m = FUSED_RE.match(canonical(name))
    return (m["prefix"], m["kind"]) if m else None
