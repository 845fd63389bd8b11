"""Which parent is named, on real fine-tunes of a real model: MiniLM siblings in BF16.

The evaluation's small Llamas are fine-tuned while still learning their
pretraining text, so their siblings' deltas correlate at about 0.6 and a
sibling is closer to a fine-tune than its own base. This benchmark makes
the fine-tunes the way uploads are made: all-MiniLM-L6-v2's real weights
(stored BF16, as hubs serve them) trained further by masked-language-model
steps (a fresh MLM head, AdamW) on disjoint text (Python's standard library
source, split by file name), and stored in BF16. It then audits each
family question and prints the parent named against the truth:

- a fine-tune against its base and one or two siblings: the base;
- a fine-tune against its siblings alone (the base absent): no parent;
- a fine-tune of a fine-tune against base, its parent and a sibling: its
  parent; against base and a sibling only: the base (an ancestor) or none.

    python -m benchmarks.siblings [--dir /tmp/lineage-siblings] [--steps 150]

Needs transformers (`pip install 'lineage[merge]'`). Takes about 6 minutes
on 2 cores (training), then a few seconds per audit.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.evalset import minilm_path, model_set
from benchmarks.tinyllama import corpus
from lineage.audit import run_local

#: (case, suspect, candidates, acceptable parents: an empty set means none may be named)
CASES = [
    ("fine-tune vs base + sibling", "ft-a", ["base", "ft-b"], {"base"}),
    ("fine-tune vs base + two siblings", "ft-a", ["base", "ft-b", "ft-c"], {"base"}),
    ("fine-tune vs two siblings (base absent)", "ft-a", ["ft-b", "ft-c"], set()),
    ("fine-tune of a fine-tune vs base + parent + sibling", "ft-a-c", ["base", "ft-a", "ft-b"], {"ft-a"}),
    ("fine-tune of a fine-tune vs base + sibling", "ft-a-c", ["base", "ft-b"], {"base", None}),
]


def train(start: dict[str, torch.Tensor], text: str, seed: int, steps: int, lr: float = 5e-5) -> dict[str, torch.Tensor]:
    """`steps` AdamW steps of masked-language modelling (15% masked, batches of 8 x 64 tokens)."""
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    folder = minilm_path().parent
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = BertForMaskedLM(BertConfig.from_pretrained(folder))
    m.bert.load_state_dict({k.removeprefix("bert."): v for k, v in start.items() if not k.startswith("pooler")}, strict=False)
    ids = torch.tensor(tok(bytes(corpus(text)[:400_000].tolist()).decode("latin-1"))["input_ids"])
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    m.train()
    for _ in range(steps):
        at = torch.randint(0, len(ids) - 64, (8,), generator=g)
        x = torch.stack([ids[j : j + 64] for j in at])
        mask = torch.rand(x.shape, generator=g) < 0.15
        labels = torch.where(mask, x, torch.full_like(x, -100))
        loss = m(input_ids=torch.where(mask, torch.full_like(x, tok.mask_token_id or 103), x), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = {k: v.detach() for k, v in m.bert.state_dict().items()}
    return {k: tuned.get(k, v) for k, v in start.items()}


def save(folder: Path, w: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))
    shutil.copy(minilm_path().parent / "config.json", folder / "config.json")
    return folder


def build(root: Path, steps: int) -> None:
    """The family, made once per folder (training is deterministic)."""
    if (root / "ft-a-c" / "model.safetensors").exists():
        return
    base = {k: v.to(torch.bfloat16).float() for k, v in load_file(str(minilm_path())).items()}
    save(root / "base", base)
    a = train(base, "ft-a", 1, steps)
    save(root / "ft-a", a)
    save(root / "ft-b", train(base, "ft-b", 2, steps))
    save(root / "ft-c", train(base, "ft-c", 3, steps))
    save(root / "ft-a-c", train(a, "ft-c", 4, steps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-siblings")
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    root = Path(a.dir)
    build(root / "models", a.steps)
    right = 0
    for name, suspect, cands, truth in CASES:
        out = root / "audits" / name.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        case = {"suspect": root / "models" / suspect, "candidates": {c: root / "models" / c for c in cands}}
        (v,) = run_local(model_set(case), out)
        named = v["parents"][0]["name"] if v["parents"] else None
        ok = v["verdict"] == "derived" and (named in truth if truth else named is None)
        right += ok
        w = {n: round(x["mean"], 2) for n, x in ((v["evidence"].get("blend") or {}).get("weights") or {}).items()}
        print(f"{name:<52} {v['verdict']:<8} parent {named!s:<6} closest {v['closest']:<6} weights {w} {'' if ok else 'WRONG'}")
    print(f"\n{right} of {len(CASES)} right")


if __name__ == "__main__":
    main()
