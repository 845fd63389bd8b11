"""The short table printed at the end of a run."""

from __future__ import annotations


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
        out.append(f"\n{v['suspect']}: {v['explanation']}")
    return "\n".join(out)
