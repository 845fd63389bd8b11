"""What a person reads: the verdict table, and report.html.

`table` is what a run prints at its end and `lineage show` prints again.
`render` writes `OUTPUT_DIR/report.html`, one self-contained page (plots
embedded as SVG data URIs, no script or style from anywhere else): the
verdict table, then per suspect its explanation and coverage, a layer x
component heatmap of its blend weights (or, for a single parent, of its
correlation with it) and one of the blend's residual, each parent's weight
per layer with its 95% interval, and the distribution of the per-tensor z
of its closest candidate against the null, with the threshold. It is
rebuilt from the Parquet dataset alone (`lineage report DIR`).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from html import escape
from pathlib import Path

import pyarrow.parquet as pq

from lineage import svg
from lineage.errors import printable
from lineage.explain.evidence import weighted
from lineage.explain.thresholds import Z_SIG
from lineage.output import atomic_write_bytes, partition_dir, parts

NO_LAYER = "-"


def parents_text(v: dict) -> str:
    ps = v.get("parents") or []
    if v["verdict"] == "blend":
        return " + ".join(f"{p['weight']:.4f} [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] {p['name']}" for p in ps)
    return ", ".join(p["name"] for p in ps) or "-"


def table(verdicts: list[dict]) -> str:
    head = ("suspect", "verdict", "parents (weight [95% CI])", "closest", "compared")
    rows = [
        (
            v["suspect"],
            v["verdict"],
            parents_text(v),
            v.get("closest") or "-",
            f"{v['coverage']['tensors_compared']}/{v['coverage']['tensors']} tensors",
        )
        for v in verdicts
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    for v in verdicts:
        out.append(f"\n{v['suspect']}: {printable(v['explanation'])}")
    return "\n".join(out)


def load_verdicts(out_dir: Path) -> list[dict]:
    """The verdicts an audit wrote, in model-set order (from verdicts.parquet's `json`)."""
    t = pq.read_table(Path(out_dir) / "verdicts.parquet", columns=["json"])
    return [json.loads(s) for s in t.column("json").to_pylist()]


def _rows(out_dir: Path, suspect: str) -> list[dict]:
    cols = ["layer", "component", "ndim", "status", "numel", "blend", "residual_rel", "candidates"]
    out = []
    for _, p in parts(partition_dir(out_dir, suspect)):
        out += pq.read_table(p, columns=cols).to_pylist()
    return out


def _layer(r: dict) -> str:
    return NO_LAYER if r["layer"] is None else str(r["layer"])


def _sort_layers(layers: set[str]) -> list[str]:
    return sorted(layers, key=lambda x: (x == NO_LAYER, int(x) if x != NO_LAYER else 0))


def suspect_section(v: dict, rows: list[dict]) -> str:
    """One suspect's part of the page."""
    ok = [r for r in rows if r["status"] == "ok"]
    mats = [r for r in ok if r["ndim"] >= 2]
    layers = _sort_layers({_layer(r) for r in ok})
    comps = sorted({r["component"] for r in ok})
    figs = []
    parents = [p["name"] for p in v.get("parents", [])]
    cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    if v["verdict"] == "blend" and parents:
        who = parents[0]
        for r in ok:
            w = next((b["weight"] for b in r["blend"] if b["candidate"] == who and b["weight"] is not None), None)
            if w is not None:
                cell[(_layer(r), r["component"])].append(w)
        title, lo, hi = f"blend weight of {who}, median per layer and component", 0.0, 1.0
    else:
        who = parents[0] if parents else v.get("closest")
        for r in ok:
            c = next((c["corr"] for c in r["candidates"] if c["candidate"] == who and c["corr"] is not None), None)
            if c is not None:
                cell[(_layer(r), r["component"])].append(c)
        title, lo, hi = f"correlation with {who}, median per layer and component", -1.0, 1.0
    if cell:
        figs.append(svg.heatmap(title, layers, comps, {k: statistics.median(x) for k, x in cell.items()}, lo, hi))
    res: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ok:
        if r["residual_rel"] is not None:
            res[(_layer(r), r["component"])].append(r["residual_rel"])
    if res:
        med = {k: statistics.median(x) for k, x in res.items()}
        figs.append(
            svg.heatmap("blend residual |s - fit| / |s|, median", layers, comps, med, 0.0, max(med.values()) or 1.0, "{:.2g}")
        )
    if v["verdict"] == "blend" and len(parents) >= 2:
        by_layer: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in mats:
            for b in r["blend"]:
                if b["candidate"] in parents and b["weight"] is not None:
                    by_layer[b["candidate"]][_layer(r)].append((b["weight"], b["se"], float(r["numel"])))
        xs = [x for x in layers if x != NO_LAYER]
        series = {}
        for p in parents:
            pts = []
            for x in xs:
                vals = by_layer[p].get(x)
                if vals:
                    w = weighted(vals)
                    pts.append((w["mean"], w["ci95"][0], w["ci95"][1]))
                else:
                    pts.append(None)
            series[p] = pts
        if xs:
            figs.append(svg.intervals("each parent's weight per layer, with its 95% interval", xs, series, "weight"))
    closest = v.get("closest")
    zs = [c["z"] for r in mats for c in r["candidates"] if c["candidate"] == closest and c["z"] is not None]
    if zs:
        figs.append(svg.histogram(f"per-matrix z of {closest} against the permutation null", zs, Z_SIG))
    cov = v.get("coverage", {})
    skipped = "".join(f"<li>{escape(k)}: {n}</li>" for k, n in (cov.get("skipped") or {}).items())
    imgs = "".join(f'<img alt="plot" src="{svg.data_uri(f)}">' for f in figs)
    return (
        f'<section id="{escape(v["suspect"])}"><h2>{escape(v["suspect"])}: {escape(v["verdict"])}</h2>'
        f"<p>{escape(v.get('explanation', ''))}</p>"
        f"<p>Compared {cov.get('tensors_compared', 0)} of {cov.get('tensors', 0)} tensors "
        f"({cov.get('elements_compared_frac', 0):.0%} of the elements, {cov.get('bytes_compared', 0) / 1e9:.2f} GB read)."
        f"{'<ul>' + skipped + '</ul>' if skipped else ''}</p>{imgs}</section>"
    )


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lineage report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
img {{ margin: 6px; border: 1px solid #eee; vertical-align: top; }}
section {{ margin-top: 2em; }}
</style></head>
<body>
<h1>lineage report: {title}</h1>
<table><tr><th>suspect</th><th>verdict</th><th>parents (weight [95% CI])</th><th>closest</th><th>compared</th></tr>
{rows}
</table>
{sections}
<script>
window.addEventListener("load", function () {{
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {{ if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }}
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def render(out_dir: Path, title: str | None = None) -> Path:
    """Write OUTPUT_DIR/report.html from the audit's Parquet and verdicts; return its path."""
    out = Path(out_dir)
    verdicts = load_verdicts(out)
    rows = "".join(
        f"<tr><td><a href='#{escape(v['suspect'])}'>{escape(v['suspect'])}</a></td><td>{escape(v['verdict'])}</td>"
        f"<td>{escape(parents_text(v))}</td><td>{escape(v.get('closest') or '-')}</td>"
        f"<td>{v['coverage']['tensors_compared']}/{v['coverage']['tensors']}</td></tr>"
        for v in verdicts
    )
    sections = "".join(suspect_section(v, _rows(out, v["suspect"])) for v in verdicts)
    html = PAGE.format(title=escape(title or out.name), rows=rows, sections=sections)
    path = out / "report.html"
    atomic_write_bytes(path, html.encode())
    return path
