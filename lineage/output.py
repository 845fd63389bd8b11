"""Parquet and JSON writers that never leave a half file that looks complete.

Rows are buffered per suspect and flushed as numbered part files in a
hive-partitioned dataset (`tensors/suspect=NAME/part-NNNNNN.parquet`), each
written to a temporary name in the same folder and renamed into place
(vLLM's atomic_writer pattern). A killed run leaves whole part files only,
and every part written before the kill is kept.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lineage import __version__
from lineage.rows import PARTITION, SCHEMA
from lineage.schema import VERDICTS_VERSION, with_docs

QUARANTINE = "quarantine"
PART_RE = re.compile(r"part-(\d+)\.parquet")


@cache
def file_mode() -> int:
    """0666 less the process umask: what `open()` would give a new file.

    mkstemp creates files 0600, which hides results from the rest of a team
    on shared storage; atomic writes set this mode before the rename."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: read it by setting it (briefly) and back
    os.umask(old)
    return 0o666 & ~old


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def partition_dir(out_dir: Path, suspect: str) -> Path:
    return Path(out_dir) / "tensors" / f"{PARTITION}={suspect}"


class TensorWriter:
    """Streams rows into the `tensors/` dataset, at most `flush_rows` in memory."""

    def __init__(self, out_dir: Path, flush_rows: int = 2000) -> None:
        self.out_dir = Path(out_dir)
        self.flush_rows = flush_rows
        self._buf: dict[str, list[dict]] = defaultdict(list)
        self._seq: dict[str, int] = {}
        self.rows_written = 0
        self.max_buffered = 0

    def add(self, suspect: str, row: dict) -> None:
        self._buf[suspect].append(row)
        self.max_buffered = max(self.max_buffered, sum(len(b) for b in self._buf.values()))
        if len(self._buf[suspect]) >= self.flush_rows:
            self.flush(suspect)

    def flush(self, suspect: str | None = None) -> None:
        for s in [suspect] if suspect is not None else list(self._buf):
            rows = self._buf.pop(s, [])
            if not rows:
                continue
            folder = partition_dir(self.out_dir, s)
            seq = self._seq.get(s)
            if seq is None:  # after the highest part on disk: parts moved to quarantine leave gaps
                seq = max((i + 1 for i, _ in parts(folder)), default=0)
            atomic_write_table(folder / f"part-{seq:06d}.parquet", pa.Table.from_pylist(rows, schema=SCHEMA))
            self._seq[s] = seq + 1
            self.rows_written += len(rows)

    def close(self) -> None:
        self.flush()


def parts(folder: Path) -> list[tuple[int, Path]]:
    """(sequence number, path) of the part files in a partition folder, in order."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PART_RE.fullmatch(p.name))]
    return sorted(found)


def read_rows(out_dir: Path, suspect: str, columns: list[str] | None = None) -> list[dict]:
    """All rows of one suspect, read back from its partition."""
    files = [p for _, p in parts(partition_dir(out_dir, suspect))]
    if not files:
        return []
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA, columns=columns) for p in files]).to_pylist()


def check_parts(out_dir: Path, suspect: str, say=None) -> list[str]:
    """Validate an earlier run's part files of one suspect before resuming from them.

    A part that cannot be read back whole with the dataset's schema
    (truncated, emptied, overwritten, from another version) is moved into
    `OUTPUT_DIR/quarantine/` and named in a message, so its tensors are
    planned again; leftover temporary files of a killed write are removed.
    Returns the tensors the remaining parts hold (each once: a tensor found
    in two parts keeps the first, and the later part is quarantined, since
    nothing may be counted twice)."""
    folder = partition_dir(out_dir, suspect)
    if not folder.is_dir():
        return []
    for p in folder.iterdir():
        if p.name.startswith(".part-") and p.is_file():
            p.unlink()
    seen: set[str] = set()
    tensors: list[str] = []
    for _, p in parts(folder):
        try:
            if not p.is_file() or p.is_symlink():
                raise ValueError("not a regular file")
            t = pq.read_table(p, schema=SCHEMA, columns=["tensor"]).column("tensor").to_pylist()
            pq.read_table(p, schema=SCHEMA)  # every column decodes, not just the names
            if seen.intersection(t):
                raise ValueError("holds tensors already in an earlier part")
        except (OSError, ValueError, pa.ArrowException) as e:
            dest = Path(out_dir) / QUARANTINE / f"{PARTITION}={suspect}"
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / p.name
            k = 1
            while target.exists():
                target, k = dest / f"{p.name}.{k}", k + 1
            os.replace(p, target)
            if say is not None:
                say(f"warning: {p} is unreadable ({str(e).splitlines()[0][:200]}); moved to {target}, its tensors are recomputed")
            continue
        seen.update(t)
        tensors.extend(t)
    return tensors


PARENT = pa.struct([("name", pa.string()), ("weight", pa.float64()), ("ci95_low", pa.float64()), ("ci95_high", pa.float64())])
VERDICT_SCHEMA = with_docs(
    pa.schema(
        [
            ("suspect", pa.string()),
            ("verdict", pa.string()),
            ("method", pa.string()),
            ("merge_family", pa.string()),
            ("base", pa.string()),
            ("t", pa.float64()),
            ("parents", pa.list_(PARENT)),
            ("parent_names", pa.list_(pa.string())),
            ("closest", pa.string()),
            ("aliases", pa.list_(pa.string())),
            ("screened_out", pa.list_(pa.string())),
            ("relation_count", pa.int64()),
            ("tensors", pa.int64()),
            ("tensors_compared", pa.int64()),
            ("bytes_compared", pa.int64()),
            ("elements_compared_frac", pa.float64()),
            ("tensors_skipped", pa.int64()),
            ("inconclusive_reason", pa.string()),
            ("layer_map", pa.string()),
            ("error", pa.string()),
            ("source", pa.string()),
            ("source_commit", pa.string()),
            ("candidate_sources", pa.list_(pa.struct([("name", pa.string()), ("source", pa.string()), ("commit", pa.string())]))),
            ("lineage_version", pa.string()),
            ("schema_version", pa.int64()),
            ("audited_at", pa.timestamp("s", tz="UTC")),
            ("explanation", pa.string()),
            ("json", pa.string()),
        ]
    ),
    "verdicts",
)
RELATION_SCHEMA = with_docs(
    pa.schema(
        [
            ("suspect", pa.string()),
            ("other", pa.string()),
            ("other_role", pa.string()),
            ("kind", pa.string()),
            ("weight", pa.float64()),
            ("z", pa.float64()),
            ("corr", pa.float64()),
            ("matrices", pa.int64()),
        ]
    ),
    "relations",
)


def verdict_row(v: dict, audited_at: datetime) -> dict:
    """The flat `verdicts.parquet` row of a verdict document."""
    cov = v.get("coverage") or {}
    sources = v.get("sources") or {}
    mine = sources.get(v["suspect"], {})
    expl = v.get("explanation") or ""
    return {
        "suspect": v["suspect"],
        "verdict": v["verdict"],
        "method": v.get("method"),
        "merge_family": v.get("merge_family"),
        "base": v.get("base"),
        "t": v.get("t"),
        "parents": [
            {"name": p["name"], "weight": p["weight"], "ci95_low": p["ci95"][0], "ci95_high": p["ci95"][1]} for p in v["parents"]
        ],
        "parent_names": [p["name"] for p in v["parents"]],
        "closest": v.get("closest"),
        "aliases": sorted(a for p in v["parents"] for a in p.get("aliases", [])),
        "screened_out": [c["name"] for c in v.get("screened_out", [])],
        "relation_count": len(v.get("relations", [])),
        "tensors": cov.get("tensors", 0),
        "tensors_compared": cov.get("tensors_compared", 0),
        "bytes_compared": cov.get("bytes_compared", 0),
        "elements_compared_frac": cov.get("elements_compared_frac"),
        "tensors_skipped": sum((cov.get("skipped") or {}).values()),
        "inconclusive_reason": expl.split(": ", 1)[-1].rstrip(".") if v["verdict"] == "inconclusive" else None,
        "layer_map": json.dumps(v["layer_map"]) if v.get("layer_map") else None,
        "error": v.get("error"),
        "source": mine.get("source"),
        "source_commit": mine.get("commit"),
        "candidate_sources": [
            {"name": n, "source": d.get("source"), "commit": d.get("commit")} for n, d in sources.items() if n != v["suspect"]
        ],
        "lineage_version": __version__,
        "schema_version": VERDICTS_VERSION,
        "audited_at": audited_at,
        "explanation": expl,
        "json": json.dumps(v),
    }


def relation_rows(v: dict) -> list[dict]:
    """`relations.parquet` rows of one verdict: its parents (or, for a derived suspect that
    sits between its candidates, each related candidate), aliases, screened-out candidates
    and the other suspects it is a copy or derivative of."""
    base = {"suspect": v["suspect"], "weight": None, "z": None, "corr": None, "matrices": None}
    out = []
    for p in v["parents"]:
        out.append({**base, "other": p["name"], "other_role": "candidate", "kind": "parent", "weight": p["weight"]})
        out += [{**base, "other": a, "other_role": "candidate", "kind": "alias"} for a in p.get("aliases", [])]
    if v["verdict"] == "derived" and not v["parents"]:  # between its candidates: each related one, none a parent
        ev = v.get("evidence") or {}
        for n in (ev.get("blend") or {}).get("candidates", []):
            c = (ev.get("candidates") or {}).get(n) or {}
            w = ((ev["blend"].get("weights") or {}).get(n) or {}).get("mean")
            out.append(
                {**base, "other": n, "other_role": "candidate", "kind": "related", "weight": w, "z": c.get("median_z")}
                | {"corr": c.get("median_corr"), "matrices": c.get("matrices")}
            )
    for c in v.get("screened_out", []):
        out.append({**base, "other": c["name"], "other_role": "candidate", "kind": "screened_out", "z": c.get("median_z")})
    for r in v.get("relations", []):
        out.append(
            {
                **base,
                "other": r["suspect"],
                "other_role": "suspect",
                "kind": r["kind"],
                "z": r.get("median_delta_z"),
                "corr": r.get("median_delta_corr"),
                "matrices": r.get("matrices"),
            }
        )
    return out


def write_verdicts(out_dir: Path, verdicts: list[dict], recipes: dict[str, str] | None = None) -> None:
    """`verdicts/SUSPECT.json` (and `SUSPECT.recipe.yaml` for a blend) for each, then
    `verdicts.parquet` and `relations.parquet` for all."""
    out = Path(out_dir)
    for v in verdicts:
        atomic_write_bytes(out / "verdicts" / f"{v['suspect']}.json", (json.dumps(v, indent=2) + "\n").encode())
        if (recipes or {}).get(v["suspect"]):
            atomic_write_bytes(out / "verdicts" / f"{v['suspect']}.recipe.yaml", recipes[v["suspect"]].encode())  # type: ignore[index]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rows = [verdict_row(v, now) for v in verdicts]
    atomic_write_table(out / "verdicts.parquet", pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA))
    rel = [r for v in verdicts for r in relation_rows(v)]
    atomic_write_table(out / "relations.parquet", pa.Table.from_pylist(rel, schema=RELATION_SCHEMA))
