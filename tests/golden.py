"""Stored outputs of an earlier lineage, to show a refactoring changed nothing.

`python -m tests.golden` rewrites the stored copies under tests/data/golden
from the code as it is: run it only when a change of behaviour is intended,
and say so in the commit. The tests compare with `same`: strings, classes
and structure exactly, floats to a relative 1e-9 (what a reordered float64
sum could move; every verdict-relevant figure is far coarser).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
#: Fields added after the golden copy was made, on purpose: not compared.
NEW_FIELDS = {"unit", "sources", "lineage_version", "audited_at"}


def same(a: object, b: object, path: str = "", rel: float = 1e-9) -> list[str]:
    """Differences between two JSON-like values (empty when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted((set(a) | set(b)) - NEW_FIELDS):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'new' if k in a else 'stored'}")
            else:
                out += same(a[k], b[k], f"{path}.{k}", rel)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)} stored"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]", rel)]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=1e-300) else [f"{path}: {a!r} vs {b!r} stored"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r} stored"]


def rows_snapshot(out_dir: Path) -> list[dict]:
    """Every row of an audit's tensor dataset, by suspect and tensor, without the unit column."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(Path(out_dir) / "tensors"), format="parquet", partitioning="hive").to_table()
    rows = [{k: v for k, v in r.items() if k not in NEW_FIELDS} for r in table.to_pylist()]
    return sorted(rows, key=lambda r: (r["suspect"], r["tensor"]))


def load(name: str) -> object:
    return json.loads((GOLDEN / name).read_text())


def store(name: str, value: object) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / name).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def main() -> None:
    import tempfile

    from benchmarks.evalset import cases, model_set
    from lineage.audit import run_local
    from lineage.demo import ensure
    from lineage.modelset import ModelSet

    with tempfile.TemporaryDirectory() as tmp:
        root = ensure(Path(tmp) / "cache")
        ms = ModelSet.from_dict(
            {
                "name": "demo",
                "suspects": [{"name": "rio-mini", "source": str(root / "rio-mini")}],
                "candidates": [
                    {"name": "qwen-mini", "source": str(root / "qwen-mini"), "base": True},
                    {"name": "nex-mini", "source": str(root / "nex-mini")},
                ],
            }
        )
        (v,) = run_local(ms, Path(tmp) / "demo")
        store("demo_verdict.json", v)
        store("demo_rows.json", rows_snapshot(Path(tmp) / "demo"))
        verdicts = {}
        for i, c in enumerate(cases(Path(tmp) / "models", seeds=3, with_mergekit=False)):
            (verdicts[c["name"]],) = run_local(model_set(c), Path(tmp) / "audits" / str(i))
            print(c["name"], verdicts[c["name"]]["verdict"], flush=True)
        store("eval_verdicts.json", verdicts)


if __name__ == "__main__":
    main()
