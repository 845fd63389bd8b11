"""Hidden units permuted to hide a model's origin, found and undone.

Permuting an MLP's hidden units (the rows of its up/gate projections, the
same permutation on the columns of its down projection) leaves the function
unchanged and breaks a tensor-by-tensor comparison of those matrices. The
residual stream is untouched, so the rest of the model still matches; this
finds, for each MLP whose matrices do not match their parent's, the
permutation that matches rows best (each suspect unit's most correlated
parent unit), checks that it is one-to-one and agrees between the up and
down side, and reports the correlation once it is undone.

Attention heads are permuted the same way: query rows in blocks of one
head (head_dim = hidden_size / num_attention_heads from config.json) with
the output projection's columns, key and value rows by key/value head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lineage.align import Index
from lineage.layout import canonical, layer_prefix
from lineage.modelconfig import head_dim
from lineage.source import Model
from lineage.views import Reader, View

#: Matrices whose rows are an MLP's hidden units, and those whose columns are.
UNIT_ROWS = re.compile(r"(mlp\.(gate_proj|up_proj|w1|w3|fc1)|intermediate\.dense)\.weight$")
UNIT_COLS = re.compile(r"(mlp\.(down_proj|w2|fc2)|(?<!attention\.)output\.dense)\.weight$")
ATTN_Q = re.compile(r"(self_attn\.q_proj|attention\.self\.query)\.weight$")
ATTN_KV = re.compile(r"(self_attn\.(k_proj|v_proj)|attention\.self\.(key|value))\.weight$")
ATTN_O = re.compile(r"(self_attn\.o_proj|attention\.output\.dense)\.weight$")
MAX_ELEMENTS = 1 << 26  # read whole matrices only up to this size


@dataclass
class Permutation:
    tensors: list[str]  # suspect tensors whose units were permuted
    units: int
    corr_before: float
    corr_after: float
    what: str = "mlp units"  # or "attention heads", "key/value heads"


def _centered_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


def match_rows(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    """perm with s[i] ~ p[perm[i]], or None when the best matches are not one-to-one."""
    sim = _centered_rows(s) @ _centered_rows(p).T
    perm = sim.argmax(dim=1)
    return perm if len(set(perm.tolist())) == len(perm) else None


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _classify(name: str) -> tuple[str, str, str] | None:
    """(layer prefix, permutation group, 'rows'|'cols') of a matrix whose units can be permuted."""
    c = canonical(name)
    p = layer_prefix(name)
    if p is None:
        return None
    if UNIT_ROWS.search(c):
        return p, "mlp units", "rows"
    if UNIT_COLS.search(c):
        return p, "mlp units", "cols"
    if ATTN_Q.search(c):
        return p, "attention heads", "rows"
    if ATTN_O.search(c):
        return p, "attention heads", "cols"
    if ATTN_KV.search(c):
        return p, "key/value heads", "rows"
    return None


def _blocks(x: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows grouped into units of `unit` rows, each flattened into one row."""
    return x.reshape(x.shape[0] // unit, unit * x.shape[1])


def find(
    suspect: Model, parent: Model, unmatched: list[str], reader: Reader, warnings: list[str] | None = None
) -> list[Permutation]:
    """Permutations of MLP units and attention heads that explain the `unmatched` suspect matrices.

    Attention heads need the head size from a config.json; when neither
    model's config gives a usable one, heads are not searched and the reason
    is appended to `warnings`."""
    s_ix, p_ix = Index.build(suspect), Index.build(parent)
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for name in unmatched:
        k = _classify(name)
        if k is not None:
            groups.setdefault((k[0], k[1]), {})[name] = k[2]
    hd, why = head_dim(suspect.root)
    if hd is None:
        hd, why2 = head_dim(parent.root)
        why = why or why2
    if hd is None and why and warnings is not None and any(w != "mlp units" for _, w in groups):
        warnings.append(f"attention heads not searched for permutations: {why}")
    out = []
    for (_, what), tensors in sorted(groups.items()):
        mats = {}
        for name, kind in tensors.items():
            se = suspect.tensors[name]
            pe = p_ix.by_name.get(canonical(name))
            if pe is None or pe.shape != se.shape or len(se.shape) != 2 or se.shape[0] * se.shape[1] > MAX_ELEMENTS:
                continue
            s = reader.read(View((s_ix.seg(se),)), 0, se.shape[0])
            p = reader.read(View((p_ix.seg(pe),)), 0, pe.shape[0])
            mats[name] = (s, p) if kind == "rows" else (s.T.contiguous(), p.T.contiguous())
        unit = 1 if what == "mlp units" else hd
        if not mats or unit is None or any(s.shape[0] % unit for s, _ in mats.values()):
            continue
        mats = {n: (_blocks(s, unit), _blocks(p, unit)) for n, (s, p) in mats.items()}
        perms = {name: match_rows(s, p) for name, (s, p) in mats.items()}
        found = [v for v in perms.values() if v is not None]
        if not found or any(v is None or not torch.equal(v, found[0]) for v in perms.values()):
            continue
        perm = found[0]
        if torch.equal(perm, torch.arange(len(perm))):
            continue
        before = min(_corr(s, p) for s, p in mats.values())
        after = min(_corr(s, p[perm]) for s, p in mats.values())
        out.append(Permutation(sorted(mats), len(perm), before, after, what))
    return out
