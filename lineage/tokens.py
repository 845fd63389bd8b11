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

import json
from pathlib import Path

import numpy as np

from lineage.errors import LineageError
from lineage.files import MAX_LIST_BYTES, read_small
from lineage.remote import is_remote

TOKENIZER = "tokenizer.json"
#: Largest tokenizer.json read (real ones are 2-35 MB).
MAX_TOKENIZER_BYTES = MAX_LIST_BYTES


def read_vocab(model) -> tuple[dict[str, int] | None, str | None]:
    """(token -> id, None), (None, why it is unusable), or (None, None) when the model has none."""
    root = str(model.root)
    try:
        if is_remote(root):
            from lineage.remote.hub import read_beside

            size = model.files.get(TOKENIZER, {}).get("size")
            raw = read_beside(root, TOKENIZER, size, MAX_TOKENIZER_BYTES)
            if raw is None:
                return None, None
        else:
            path = Path(root) / TOKENIZER
            if not path.exists() and not path.is_symlink():
                return None, None
            raw = read_small(path, MAX_TOKENIZER_BYTES, TOKENIZER)
        doc = json.loads(raw.decode("utf-8"))
    except LineageError as e:
        return None, str(e)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{root}/{TOKENIZER}: not valid JSON ({e})"
    except RecursionError:
        return None, f"{root}/{TOKENIZER}: JSON nested too deeply"
    return vocab_of(doc, f"{root}/{TOKENIZER}")


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
