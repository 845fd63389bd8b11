"""The residual-stream gauge: transforms of a transformer's weights that leave its function unchanged.

A pre-norm transformer (Llama, Qwen, Mistral: RMSNorm without bias) keeps
computing the same function when its residual stream is rotated by any
orthogonal Q, once each norm's gain has been folded into the matrices that
read the norm's output: the embedding becomes E Q, every matrix reading the
stream (q/k/v, gate/up, lm_head) W diag(g) Q, every matrix writing to it
(o_proj, down_proj) Q^T W. The evader may then give the norms any new gains
and divide them out of the readers. A post-norm model with LayerNorm
(BERT), whose mean subtraction does not commute with a rotation, allows
only a permutation of the hidden dimension. Either disguise makes a
tensor-by-tensor comparison see unrelated matrices.

Undoing it: fold both models' gains into their readers (the folded
matrices are what the disguise cannot change), estimate the transform from
suspect to candidate by orthogonal Procrustes on the embedding rows of the
tokens both have (E_c Q ~ E_s; Q = U V^T from the SVD of E_c^T E_s), snap it
to a (signed) permutation when it is one within rounding, and bring the
candidate's matrices into the suspect's gauge (`Gauge.apply`). Whether the
transform is real is then decided on the other matrices, which it was not
fitted to (explain/gauge.py).

This module is arithmetic on tensors only: which tensor plays which role
(by its name), and the transforms. Reading is explain/gauge.py's and
gauge_work.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lineage.geometry import View
from lineage.layout import canonical

if TYPE_CHECKING:
    import torch

#: The token embedding: rows are tokens, columns the residual stream.
EMBED = re.compile(r"(embed_tokens|word_embeddings|wte|tok_embeddings)\.weight$")
#: Matrices whose columns read the residual stream (their input is the hidden dimension).
READS = re.compile(
    r"((self_attn\.(q_proj|k_proj|v_proj))|(mlp\.(gate_proj|up_proj|w1|w3|gate))|lm_head|"
    r"experts\.\d+\.(gate_proj|up_proj|w1|w3)|shared_experts?\.(gate_proj|up_proj)|shared_expert_gate|"
    r"block_sparse_moe\.gate|"
    r"linear_attn\.in_proj_(qkvz|qkv|z|ba|a|b)|"
    r"attention\.self\.(query|key|value)|intermediate\.dense|pooler\.dense|"
    r"position_embeddings|token_type_embeddings|wpe)\.weight$"
)
#: Matrices whose rows write to the residual stream (their output is the hidden dimension).
WRITES = re.compile(
    r"(self_attn\.o_proj|linear_attn\.out_proj|mlp\.(down_proj|w2)|experts\.\d+\.(down_proj|w2)|shared_experts?\.down_proj|"
    r"attention\.output\.dense|(?<!attention\.)output\.dense)\.weight$"
)
#: Routed experts fused into one tensor per layer: gate_up [E, 2I, hidden] reads, down [E, hidden, I] writes.
FUSED_READS = re.compile(r"experts\.gate_up_proj$")
FUSED_WRITES = re.compile(r"experts\.down_proj$")
#: Hidden-sized vectors: norm gains and biases, and the biases of the writers.
NORM = re.compile(r"(norm|LayerNorm|ln_\w+)\.(weight|bias)$")
WRITE_BIAS = re.compile(r"(self_attn\.o_proj|mlp\.down_proj|attention\.output\.dense|(?<!attention\.)output\.dense)\.bias$")

#: Which norm's gain each reader absorbs (pre-norm layouts), by the reader's canonical name.
FOLDS = (
    (
        re.compile(r"^(.*layers\.\d+\.)(self_attn\.(q_proj|k_proj|v_proj)|linear_attn\.in_proj_(qkvz|qkv|z|ba|a|b))\.weight$"),
        r"\1input_layernorm.weight",
    ),
    (re.compile(r"^(.*layers\.\d+\.)mlp\.(gate_proj|up_proj|gate)\.weight$"), r"\1post_attention_layernorm.weight"),
    (
        re.compile(
            r"^(.*layers\.\d+\.)(mlp\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight|mlp\.experts\.gate_up_proj|"
            r"mlp\.shared_experts?\.(gate_proj|up_proj)\.weight|mlp\.shared_expert_gate\.weight|"
            r"block_sparse_moe\.(gate|experts\.\d+\.(w1|w3))\.weight)$"
        ),
        r"\1post_attention_layernorm.weight",
    ),
    (re.compile(r"^lm_head\.weight$"), "norm.weight"),
)


#: Model types whose norms multiply by (1 + w) rather than w (the gain folded is 1 + w). Gemma 2
#: and 3's sandwich norms rule rotations out (explain/gauge.prenorm).
OFFSET_GAIN_TYPES = (
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    # Qwen3-Next and Qwen3.5 (Qwen3.5-397B-A17B): zero-centred gains, stored near 0
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
)


@dataclass(frozen=True)
class Gain:
    """A norm's stored weight and what the norm multiplies by: weight + offset."""

    view: View
    offset: float = 0.0


def role(name: str) -> str | None:
    """'embed', 'reads' (hidden on the columns), 'writes' (hidden on the rows), 'norm', 'vec'
    (a writer's bias) or None (a tensor the residual gauge does not touch: per-head norms, ...)."""
    c = canonical(name)
    if EMBED.search(c):
        return "embed"
    if READS.search(c) or FUSED_READS.search(c):
        return "reads"
    if WRITES.search(c) or FUSED_WRITES.search(c):
        return "writes"
    if NORM.search(c) and not re.search(r"(q_norm|k_norm|linear_attn\.norm)\.", c):
        return "norm"
    if WRITE_BIAS.search(c):
        return "vec"
    return None


def folded_norm(name: str) -> str | None:
    """Canonical name of the norm whose gain the reader `name` absorbs when folded (pre-norm only)."""
    c = canonical(name)
    for pat, repl in FOLDS:
        if pat.search(c):
            return pat.sub(repl, c)
    return None


def procrustes(e_c: torch.Tensor, e_s: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q minimising |e_c Q - e_s| (float64): U V^T of the SVD of e_c^T e_s."""
    import torch

    u, _, vh = torch.linalg.svd(e_c.double().T @ e_s.double())
    return u @ vh


def snap(q: torch.Tensor, signed: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(perm, signs) with q ~ P (q[perm[j], j] = signs[j]) when q is a (signed) permutation
    within rounding: every column's largest entry above 0.9 in magnitude, one-to-one."""
    a = q.abs()
    val, idx = a.max(dim=0)
    perm = idx.cpu().numpy()
    if float(val.min()) < 0.9 or len(set(perm.tolist())) != len(perm):
        return None
    signs = np.sign(q[idx, np.arange(q.shape[1])].cpu().numpy())
    if not signed and (signs < 0).any():
        return None
    return perm, signs


@dataclass
class Gauge:
    """A candidate's transform into the suspect's gauge: s ~ apply(c).

    `perm`/`signs` when the transform is a (signed) permutation (column j of
    the suspect's stream is signs[j] times column perm[j] of the
    candidate's), else the orthogonal `q` (float32, hidden x hidden).
    `fold`: both models' norm gains are folded into their readers first
    (pre-norm models; the norms themselves are then not compared)."""

    q: np.ndarray | None
    perm: np.ndarray | None
    signs: np.ndarray | None
    fold: bool

    @property
    def identity(self) -> bool:
        return self.perm is not None and self.signs is None and bool((self.perm == np.arange(len(self.perm))).all())

    @property
    def kind(self) -> str:
        if self.perm is None:
            return "rotation"
        if self.identity:
            return "identity"
        return "signed permutation" if (self.signs is not None and (self.signs < 0).any()) else "permutation"

    def cols(self, x: torch.Tensor) -> torch.Tensor:
        """x with its columns (the hidden dimension) brought into the suspect's gauge."""
        import torch

        if self.perm is not None:
            y = x[:, torch.from_numpy(self.perm)]
            return y * torch.from_numpy(self.signs).to(y.dtype) if self.signs is not None else y
        return x.double() @ torch.from_numpy(self.q).double()

    def apply(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """The candidate's tensor `x` (2-D; vectors as one row) of role `what` in the suspect's gauge."""
        if what in ("embed", "reads", "vec", "norm"):
            if what == "norm" and self.perm is not None:
                return x[:, self.perm]  # gains permute, never change sign
            return self.cols(x)
        if what == "writes":
            import torch

            h = len(self.perm) if self.perm is not None else self.q.shape[0]  # type: ignore[union-attr]
            if x.shape[0] != h and x.shape[0] % h == 0:  # fused experts: [E * hidden, inner], one expert at a time
                return torch.cat([self.apply(b, "writes") for b in x.split(h)])
            return self.cols(x.T.contiguous()).T.contiguous()
        raise ValueError(f"no gauge transform for a tensor of role {what!r}")


def gauge_from(q: torch.Tensor, fold: bool, signed: bool) -> Gauge:
    """The Gauge of an estimated Q: a permutation when it snaps to one (exact), else the rotation."""
    s = snap(q, signed)
    if s is not None:
        perm, signs = s
        return Gauge(None, perm, signs if (signs < 0).any() else None, fold)
    return Gauge(q.float().cpu().numpy(), None, None, fold)


def distances(q: torch.Tensor) -> dict[str, float]:
    """How far an estimated transform is from the identity and from a permutation (both 0..sqrt(2)-ish:
    the RMS over columns of |q e_j - target_j|)."""
    import torch

    h = q.shape[0]
    eye = torch.eye(h, dtype=q.dtype)
    a = q.abs()
    nearest = torch.zeros_like(q)
    idx = a.argmax(dim=0)
    nearest[idx, torch.arange(h)] = torch.sign(q[idx, torch.arange(h)])
    return {
        "from_identity": float((q - eye).norm() / h**0.5),
        "from_permutation": float((q - nearest).norm() / h**0.5),
    }
