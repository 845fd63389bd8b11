"""Function-preserving disguises of a model's weights: the evader's toolbox (issue 15).

Each attack takes a state dict and returns another that computes the same
function (checked by running it: `llama_logits` / `bert_hidden`, see
`check`), with weights a tensor-by-tensor comparison no longer recognises:

- `permute_hidden`: a permutation of the residual (hidden) dimension;
- `rotate_residual`: norm gains folded into the matrices that read them,
  then the residual stream rotated by a random orthogonal matrix, and
  optionally random new gains divided back out of the readers (the variant
  that defeats invariants built on the folded products);
- `scale_mlp_units`: each SwiGLU unit's up row times s, its down column over s;
- `scale_qk`: per key/value group, queries times s and keys over s;
- `transform_qk` / `transform_vo`: per key/value group an invertible A on
  queries and A^-T on keys; M on values and M^-1 on the output columns;
- `everything`: all of them in turn.

Llama-shaped dicts as benchmarks/evalset.py builds them (no rotary
embedding, so any A is allowed), and BERT for `permute_hidden`.
"""

from __future__ import annotations

import json
import math
import re

import torch
import torch.nn.functional as F

from benchmarks.tinyllama import forward

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layers(w: dict) -> list[str]:
    return sorted({m.group(0) for k in w if (m := LAYER.match(k))}, key=lambda p: int(p.split(".")[2]))


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _gains(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))


def _out(w: dict, new: dict) -> dict:
    """`new` in `w`'s dtypes."""
    return {k: v.to(w[k].dtype) for k, v in new.items()}


def fold_norms(w: dict) -> dict:
    """Llama: every RMSNorm gain multiplied into the columns of the matrices reading it; gains 1."""
    x = {k: v.double() for k, v in w.items()}
    for p in _layers(w):
        g = x[p + "input_layernorm.weight"]
        for n in ("q_proj", "k_proj", "v_proj"):
            x[f"{p}self_attn.{n}.weight"] = x[f"{p}self_attn.{n}.weight"] * g
        x[p + "input_layernorm.weight"] = torch.ones_like(g)
        g = x[p + "post_attention_layernorm.weight"]
        for n in ("gate_proj", "up_proj"):
            x[f"{p}mlp.{n}.weight"] = x[f"{p}mlp.{n}.weight"] * g
        x[p + "post_attention_layernorm.weight"] = torch.ones_like(g)
    x["lm_head.weight"] = x["lm_head.weight"] * x["model.norm.weight"]
    x["model.norm.weight"] = torch.ones_like(x["model.norm.weight"])
    return _out(w, x)


def _residual(w: dict, q: torch.Tensor) -> dict:
    """Llama with its residual stream multiplied by q (norms must be folded, or q a permutation)."""
    x = {k: v.double() for k, v in w.items()}
    x["model.embed_tokens.weight"] = x["model.embed_tokens.weight"] @ q
    x["lm_head.weight"] = x["lm_head.weight"] @ q
    for p in _layers(w):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            x[f"{p}{n}.weight"] = x[f"{p}{n}.weight"] @ q
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            x[f"{p}{n}.weight"] = q.T @ x[f"{p}{n}.weight"]
        for n in ("input_layernorm", "post_attention_layernorm"):
            x[f"{p}{n}.weight"] = _moved(x[f"{p}{n}.weight"], q)
    x["model.norm.weight"] = _moved(x["model.norm.weight"], q)
    return _out(w, x)


def _moved(gain: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A norm's gain under the residual transform q: permuted by a permutation; under a
    rotation it must already be folded (all 1), and stays so."""
    if bool(((q == 0) | (q == 1)).all()):
        return gain @ q
    assert bool((gain == 1).all()), "fold the norms before rotating the residual stream"
    return gain


def permute_hidden(w: dict, seed: int) -> dict:
    """The hidden dimension permuted (Llama or BERT)."""
    g = torch.Generator().manual_seed(seed)
    if "model.embed_tokens.weight" in w:
        h = w["model.embed_tokens.weight"].shape[1]
        return _residual(w, torch.eye(h, dtype=torch.float64)[:, torch.randperm(h, generator=g)])
    return _permute_bert(w, g)


def rotate_residual(w: dict, seed: int, new_gains: bool = False) -> dict:
    """Norms folded, the residual stream rotated by a random orthogonal matrix; with `new_gains`,
    random gains in [0.5, 2] given to the norms and divided out of their readers."""
    g = torch.Generator().manual_seed(seed)
    h = w["model.embed_tokens.weight"].shape[1]
    x = _residual(fold_norms(w), _orthogonal(h, g))
    if not new_gains:
        return x
    x = {k: v.double() for k, v in x.items()}
    for p in _layers(w):
        for norm, readers in (
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ):
            gain = _gains(h, g)
            x[f"{p}{norm}.weight"] = gain
            for r in readers:
                x[f"{p}{r}.weight"] = x[f"{p}{r}.weight"] / gain
    gain = _gains(h, g)
    x["model.norm.weight"], x["lm_head.weight"] = gain, x["lm_head.weight"] / gain
    return _out(w, x)


def scale_mlp_units(w: dict, seed: int) -> dict:
    """Each SwiGLU unit's up row times s (random, either sign, |s| in [0.5, 2]), its down column over s."""
    g = torch.Generator().manual_seed(seed)
    x = {k: v.double() for k, v in w.items()}
    for p in _layers(w):
        up = x[p + "mlp.up_proj.weight"]
        s = _gains(up.shape[0], g) * torch.where(torch.rand(up.shape[0], generator=g) < 0.5, -1.0, 1.0).double()
        x[p + "mlp.up_proj.weight"] = up * s[:, None]
        x[p + "mlp.down_proj.weight"] = x[p + "mlp.down_proj.weight"] / s
    return _out(w, x)


def _groups(w: dict, p: str, heads: int, kv: int) -> tuple[int, int]:
    """(head_dim, query heads per key/value head) of layer `p`."""
    hd = w[p + "self_attn.q_proj.weight"].shape[0] // heads
    return hd, heads // kv


def transform_qk(w: dict, seed: int, heads: int, kv: int, scale_only: bool = False) -> dict:
    """Per key/value group: queries by an invertible A (a scalar when `scale_only`), keys by A^-T."""
    g = torch.Generator().manual_seed(seed)
    x = {k: v.double() for k, v in w.items()}
    for p in _layers(w):
        hd, rep = _groups(w, p, heads, kv)
        q, k = x[p + "self_attn.q_proj.weight"].clone(), x[p + "self_attn.k_proj.weight"].clone()
        for j in range(kv):
            if scale_only:
                a = float(_gains(1, g)[0]) * torch.eye(hd, dtype=torch.float64)
            else:
                a = torch.eye(hd, dtype=torch.float64) + 0.5 * torch.randn(hd, hd, generator=g, dtype=torch.float64) / math.sqrt(
                    hd
                )
            ks = slice(j * hd, (j + 1) * hd)
            k[ks] = torch.linalg.inv(a).T @ k[ks]
            for r in range(rep):
                qs = slice((j * rep + r) * hd, (j * rep + r + 1) * hd)
                q[qs] = a @ q[qs]
        x[p + "self_attn.q_proj.weight"], x[p + "self_attn.k_proj.weight"] = q, k
    return _out(w, x)


def transform_vo(w: dict, seed: int, heads: int, kv: int) -> dict:
    """Per key/value group: values by an invertible M, the output columns of its heads by M^-1."""
    g = torch.Generator().manual_seed(seed)
    x = {k: v.double() for k, v in w.items()}
    for p in _layers(w):
        hd, rep = _groups(w, p, heads, kv)
        v, o = x[p + "self_attn.v_proj.weight"].clone(), x[p + "self_attn.o_proj.weight"].clone()
        for j in range(kv):
            m = torch.eye(hd, dtype=torch.float64) + 0.5 * torch.randn(hd, hd, generator=g, dtype=torch.float64) / math.sqrt(hd)
            vs = slice(j * hd, (j + 1) * hd)
            v[vs] = m @ v[vs]
            for r in range(rep):
                os_ = slice((j * rep + r) * hd, (j * rep + r + 1) * hd)
                o[:, os_] = o[:, os_] @ torch.linalg.inv(m)
        x[p + "self_attn.v_proj.weight"], x[p + "self_attn.o_proj.weight"] = v, o
    return _out(w, x)


def everything(w: dict, seed: int, heads: int, kv: int) -> dict:
    """Every disguise above, one after the other."""
    w = rotate_residual(w, seed, new_gains=True)
    w = scale_mlp_units(w, seed + 1)
    w = transform_qk(w, seed + 2, heads, kv)
    return transform_vo(w, seed + 3, heads, kv)


VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight", "embeddings.word_embeddings.weight")


def permute_vocab(w: dict, tokenizer: dict, seed: int) -> tuple[dict, dict]:
    """The token ids reordered: the embedding's (and the head's) rows permuted and the
    tokenizer rewritten to match, so every text is computed as before. Row i of the new model
    is row p[i] of the old; token id j becomes inv[j]."""
    g = torch.Generator().manual_seed(seed)
    rows = next(v.shape[0] for k, v in w.items() if k.endswith(VOCAB_ROWS))
    p = torch.randperm(rows, generator=g)
    inv = torch.empty_like(p)
    inv[p] = torch.arange(rows)
    out = {k: v[p] if k.endswith(VOCAB_ROWS) else v for k, v in w.items()}
    tok = json.loads(json.dumps(tokenizer))
    tok["model"]["vocab"] = {t: int(inv[i]) for t, i in tokenizer["model"]["vocab"].items()}
    for e in tok.get("added_tokens", []):
        e["id"] = int(inv[e["id"]])
    return out, tok


def plain_tokenizer(rows: int) -> dict:
    """A tokenizer.json for byte-level models without one: token "<i>" is row i."""
    return {
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "WordLevel", "vocab": {f"<{i}>": i for i in range(rows)}, "unk_token": "<0>"},
    }


def vocab_check(before: dict, after: dict, tok_before: dict, tok_after: dict, cfg: dict | None) -> float:
    """Largest change of the Llama's logits when each text is encoded by its own tokenizer:
    the same tokens, their ids mapped from one vocabulary to the other."""
    old, new = tok_before["model"]["vocab"], tok_after["model"]["vocab"]
    to_new = torch.tensor([new[t] for t, _ in sorted(old.items(), key=lambda kv: kv[1])])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(to_new), (2, 32 if cfg else 16), generator=g)
    if cfg is None:  # BERT: the inner products of the last hidden states
        a, b = bert_hidden(before, tokens=tokens).flatten(0, 1), bert_hidden(after, tokens=to_new[tokens]).flatten(0, 1)
        a, b = a @ a.T, b @ b.T
        return float((a - b).abs().max() / a.abs().max())
    with torch.no_grad():
        a = forward({k: v.double() for k, v in before.items()}, tokens, cfg["layers"], cfg["heads"], cfg["kv"])
        b = forward({k: v.double() for k, v in after.items()}, to_new[tokens], cfg["layers"], cfg["heads"], cfg["kv"])
    return float((a - b[..., to_new]).abs().max() / a.abs().max())


def llama_logits(w: dict, cfg: dict, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg["vocab"], (2, 32), generator=g)
    with torch.no_grad():
        return forward({k: v.double() for k, v in w.items()}, tokens, cfg["layers"], cfg["heads"], cfg["kv"])


def check(before: dict, after: dict, cfg: dict | None) -> float:
    """Largest change of the model's output (logits for Llama `cfg`; for BERT, the inner
    products of its last hidden states, which a sentence-embedding model is used by and
    which a change of basis of the hidden dimension keeps), relative to the output's
    largest magnitude: float64 arithmetic on the stored weights."""
    run = (lambda w: llama_logits(w, cfg)) if cfg is not None else bert_gram
    a, b = run(before), run(after)
    return float((a - b).abs().max() / a.abs().max())


# -- BERT ------------------------------------------------------------------------------


def _bert_layers(w: dict) -> list[str]:
    pat = re.compile(r"^(.*encoder\.layer\.\d+\.)")
    return sorted({m.group(1) for k in w if (m := pat.match(k))}, key=lambda p: int(p.rstrip(".").split(".")[-1]))


def _permute_bert(w: dict, g: torch.Generator) -> dict:
    """Every tensor's hidden dimension permuted: embeddings' columns, LayerNorms, the readers'
    columns, the writers' rows and biases; the pooler's input."""
    h = next(v.shape[1] for k, v in w.items() if k.endswith("word_embeddings.weight"))
    p = torch.randperm(h, generator=g)
    out = {}
    for k, v in w.items():
        if re.search(r"embeddings\.(word|position|token_type)_embeddings\.weight$", k):
            out[k] = v[:, p]
        elif re.search(r"LayerNorm\.(weight|bias)$", k):
            out[k] = v[p]
        elif re.search(r"(attention\.self\.(query|key|value)|intermediate\.dense|pooler\.dense)\.weight$", k):
            out[k] = v[:, p]
        elif re.search(r"(attention\.output\.dense|(?<!attention\.)output\.dense)\.(weight|bias)$", k):
            out[k] = v[p]
        else:
            out[k] = v
    return out


def bert_gram(w: dict) -> torch.Tensor:
    x = bert_hidden(w).flatten(0, 1)
    return x @ x.T


def bert_hidden(w: dict, seed: int = 0, heads: int = 12, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """all-MiniLM-L6-v2's last hidden state for random tokens (post-LN BERT, float64)."""
    x = {k.removeprefix("bert."): v.double() for k, v in w.items()}
    g = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = torch.randint(0, x["embeddings.word_embeddings.weight"].shape[0], (2, 16), generator=g)

    def ln(y: torch.Tensor, pre: str) -> torch.Tensor:
        return F.layer_norm(y, y.shape[-1:], x[pre + "LayerNorm.weight"], x[pre + "LayerNorm.bias"], 1e-12)

    def lin(y: torch.Tensor, pre: str) -> torch.Tensor:
        return y @ x[pre + "weight"].T + x[pre + "bias"]

    e = "embeddings."
    h = (
        x[e + "word_embeddings.weight"][tokens]
        + x[e + "position_embeddings.weight"][:16]
        + x[e + "token_type_embeddings.weight"][0]
    )
    h = ln(h, e)
    b, t, d = h.shape
    for p in _bert_layers(x):
        q, k, v = (
            lin(h, f"{p}attention.self.{n}.").view(b, t, heads, d // heads).transpose(1, 2) for n in ("query", "key", "value")
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = ln(h + lin(a, p + "attention.output.dense."), p + "attention.output.")
        f = lin(F.gelu(lin(h, p + "intermediate.dense.")), p + "output.dense.")
        h = ln(h + f, p + "output.")
    return h


def disguised(before: dict, after: dict, cfg: dict | None, what: str) -> dict:
    """`after`, once checked to compute what `before` computes (relative 1e-5: float32 storage)."""
    err = check(before, after, cfg)
    if not err < 1e-5:
        raise AssertionError(f"{what}: the disguise changed the model's output (relative {err:.2g})")
    return after


def cases(root, add, save, cfg: dict, models: dict, paths: dict, fam: dict, ft: dict, bert: dict, bert_path) -> None:
    """The attack suite of the evaluation set (issue 15): each disguise of real trained models,
    checked function-preserving, with what the audit must say; and the controls."""
    h, kv = cfg["heads"], cfg["kv"]
    base, other = models[0], models[1]
    ft1, ft2 = ft

    def case(name: str, w: dict, before: dict, cands: dict, expect: str, **truth) -> None:
        folder = root / ("atk-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        add(f"disguise: {name}", save(folder, disguised(before, w, cfg, name)), cands, expect, **truth)

    one = {"base": paths[0]}
    case("hidden dim permuted", permute_hidden(base, 31), base, one, "identical", undone=["residual permutation"])
    case("residual rotated, norms folded", rotate_residual(base, 32), base, one, "identical", undone=["residual rotation"])
    case("rotated, random new gains", rotate_residual(base, 33, True), base, one, "identical", undone=["residual rotation"])
    case("fine-tune, rotated", rotate_residual(ft1, 34, True), ft1, one, "derived", parent="base", undone=["residual rotation"])
    mlp, qk, ov = ["MLP units rescaled or permuted"], ["Q/K heads transformed or permuted"], ["V/O heads transformed or permuted"]
    case("MLP units scaled", scale_mlp_units(base, 35), base, one, "identical", undone=mlp)
    case("Q/K scaled per head", transform_qk(base, 36, h, kv, scale_only=True), base, one, "identical", undone=qk)
    case("Q/K by A and A^-T", transform_qk(base, 37, h, kv), base, one, "identical", undone=qk)
    case("V/O by M and M^-1", transform_vo(base, 38, h, kv), base, one, "identical", undone=ov)
    every = ["residual rotation", *mlp, *qk, *ov]
    case("all of them", everything(base, 39, h, kv), base, one, "identical", undone=every)
    case("all of them, on a fine-tune", everything(ft1, 40, h, kv), ft1, one, "derived", parent="base", undone=every)
    from benchmarks.evalset import permute_mlp  # the unit permutation the evaluation set already uses

    units = ["mlp units permutation"]
    case(
        "hidden dim and MLP units permuted",
        permute_mlp(permute_hidden(base, 53), 54),
        base,
        one,
        "identical",
        undone=["residual permutation", *units],
    )
    case(
        "rotated, MLP units permuted",
        permute_mlp(rotate_residual(base, 55, True), 56),
        base,
        one,
        "identical",
        undone=["residual rotation", *units],
    )
    lin = {k: 0.6 * ft1[k] + 0.4 * ft2[k] for k in base}
    case(
        "0.6/0.4 blend rotated after merging",
        rotate_residual(lin, 41, True),
        lin,
        fam,
        "blend",
        weights={"ft1": 0.6, "ft2": 0.4},
        undone=["residual rotation"],
    )
    case(
        "all of them, on a 0.6/0.4 blend",
        everything(lin, 46, h, kv),
        lin,
        fam,
        "blend",
        weights={"ft1": 0.6, "ft2": 0.4},
        undone=every,
    )
    rot2 = root / "atk-ft2-rotated"
    save(rot2, disguised(ft2, rotate_residual(ft2, 42, True), cfg, "ft2 rotated"))
    add(
        "disguise: 0.6/0.4 blend, one parent published rotated",
        save(root / "atk-lin", lin),
        {"base": paths[0], "ft1": fam["ft1"], "ft2": rot2},
        "blend",
        weights={"ft1": 0.6, "ft2": 0.4},
        undone=["residual rotation"],
    )
    case("unrelated model, rotated (control)", rotate_residual(other, 43, True), other, one, "unrelated")
    case("unrelated model, hidden permuted (control)", permute_hidden(other, 44), other, one, "unrelated")
    # the vocabulary reordered, with the tokenizer rewritten (the base given a plain tokenizer.json)
    tok = plain_tokenizer(cfg["vocab"])
    tbase = save(root / "atk-base-tokenized", base)
    (tbase / "tokenizer.json").write_text(json.dumps(tok))
    for name, w0, seed, truth in (
        ("vocabulary reordered", base, 47, {"expect": "identical", "undone": ["vocabulary reordered"]}),
        (
            "vocabulary reordered, residual rotated",
            rotate_residual(base, 48, True),
            49,
            {"expect": "identical", "undone": ["vocabulary reordered", "residual rotation"]},
        ),
        ("unrelated model, vocabulary reordered (control)", other, 50, {"expect": "unrelated"}),
    ):
        w1, tok1 = permute_vocab(w0, tok, seed)
        err = vocab_check(w0, w1, tok, tok1, cfg)
        if not err < 1e-5:
            raise AssertionError(f"{name}: the disguise changed the model's output (relative {err:.2g})")
        folder = save(root / ("atk-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")), w1)
        (folder / "tokenizer.json").write_text(json.dumps(tok1))
        expect = truth.pop("expect")
        add(f"disguise: {name}", folder, {"base": tbase}, expect, **truth)
    mtok = json.loads((bert_path.parent / "tokenizer.json").read_text())
    w1, tok1 = permute_vocab(permute_hidden(bert, 51), mtok, 52)
    err = vocab_check(bert, w1, mtok, tok1, None)
    if not err < 1e-5:
        raise AssertionError(f"minilm vocabulary reordered: the disguise changed the model's output (relative {err:.2g})")
    folder = save(root / "atk-minilm-vocabulary-reordered", w1, None)
    (folder / "tokenizer.json").write_text(json.dumps(tok1))
    add(
        "disguise: minilm vocabulary reordered, hidden dim permuted",
        folder,
        {"minilm": bert_path},
        "identical",
        undone=["vocabulary reordered", "residual permutation"],
    )
    folder = root / "atk-minilm-hidden-permuted"
    add(
        "disguise: minilm hidden dim permuted",
        save(folder, disguised(bert, permute_hidden(bert, 45), None, "minilm hidden permuted"), None),
        {"minilm": bert_path},
        "identical",
        undone=["residual permutation"],
    )
