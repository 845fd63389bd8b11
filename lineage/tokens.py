"""Token strings: which embedding rows of two models belong to the same token.

Two models whose vocabularies differ (tokens added, or the ids reordered,
which with the tokenizer rewritten leaves the model's function unchanged)
are compared on the tokens both have: each model's `tokenizer.json` (the
Hugging Face tokenizers format: `model.vocab` as {token: id} for BPE and
WordPiece, [[token, score], ...] for Unigram, plus `added_tokens`) gives
token -> id, and the shared tokens pair a suspect row with a candidate row.
The file is hostile input like every other: read with a size cap, its JSON
depth bounded, ids checked to be row numbers.
"""

from __future__ import annotations

import numpy as np

from lineage.files import MAX_LIST_BYTES
from lineage.modelconfig import read_json_beside

TOKENIZER = "tokenizer.json"
#: Largest tokenizer.json read (real ones are 2-35 MB).
MAX_TOKENIZER_BYTES = MAX_LIST_BYTES


def read_vocab(model) -> tuple[dict[str, int] | None, str | None]:
    """(token -> id, None), (None, why it is unusable), or (None, None) when the model has none."""
    doc, why = read_json_beside(model, TOKENIZER, MAX_TOKENIZER_BYTES)
    if doc is None:
        return None, why
    return vocab_of(doc, f"{model.root}/{TOKENIZER}")


def vocab_of(doc: object, where: str) -> tuple[dict[str, int] | None, str | None]:
    """token -> id from a parsed tokenizer.json, or (None, why)."""
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        items = list(vocab.items())
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...], the id is the position
        items = [(e[0], i) for i, e in enumerate(vocab) if isinstance(e, list) and e]
    else:
        return None, f"{where}: no model.vocab"
    added = doc.get("added_tokens") if isinstance(doc, dict) else None
    for e in added if isinstance(added, list) else []:
        if isinstance(e, dict):
            items.append((e.get("content"), e.get("id")))
    for tok, i in items:
        if not isinstance(tok, str) or not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 1 << 31:
            return None, f"{where}: token {str(tok)[:40]!r} has id {str(i)[:40]!r}, not a row number"
        out.setdefault(tok, i)
    return out, None


def shared_rows(vs: dict[str, int], vc: dict[str, int], rows_s: int, rows_c: int) -> tuple[np.ndarray, np.ndarray]:
    """Suspect and candidate row of every token both vocabularies have (ids within the matrices'
    rows; each row used once), in the suspect's row order."""
    pairs = {}
    used = set()
    for tok, i in vs.items():
        j = vc.get(tok)
        if j is None or i >= rows_s or j >= rows_c or i in pairs or j in used:
            continue
        pairs[i] = j
        used.add(j)
    s = np.array(sorted(pairs), dtype=np.int64)
    return s, np.array([pairs[i] for i in s], dtype=np.int64)


def reordered(s: np.ndarray, c: np.ndarray) -> bool:
    """The shared tokens sit at different rows in the two models."""
    return bool(len(s)) and not np.array_equal(s, c)
