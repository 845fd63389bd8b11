"""The `lineage` command: `audit`, `show`, `report`, `certify`.

    lineage audit [hydra overrides]     the same as `python -m jobs.audit ...`
    lineage show OUTPUT_DIR             the verdict table and explanations, from the Parquet (no Ray)
    lineage report OUTPUT_DIR           (re)writes OUTPUT_DIR/report.html and prints its path
    lineage certify OUTPUT_DIR          reruns each blend's recovered recipe with mergekit and
                                        compares the result with the suspect (lineage/certify.py)

Installed as a console script, it runs from any folder: its own directory
is not the current one, so a folder that happens to be called `lineage`
(the clone's, seen from the folder that holds it) cannot shadow the package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lineage.errors import LineageError, printable

USAGE = """usage: lineage COMMAND ...

  lineage audit [hydra overrides]   audit a model set (lineage audit --help for the settings)
  lineage show OUTPUT_DIR           print an audit's verdicts and explanations again (no Ray)
  lineage report OUTPUT_DIR         write OUTPUT_DIR/report.html again and print its path
  lineage certify OUTPUT_DIR [--layers-per-task N]
                                    rerun each blend's recovered recipe (verdicts/*.recipe.yaml) with
                                    mergekit (pip install 'lineage[merge]') and compare with the suspect;
                                    with N, as Ray tasks over ranges of N layers

exit codes: 0 done; 1 configuration error; 2 bad input, nothing audited; 3 some suspects
could not be opened (the others were audited); 130 / 143 stopped (a rerun resumes)
"""


def _output_dir(args: list[str]) -> Path:
    if len(args) != 1:
        raise LineageError("expected one OUTPUT_DIR")
    out = Path(args[0]).expanduser()
    if not (out / "verdicts.parquet").is_file():
        raise LineageError(f"{out}: no verdicts.parquet here; is it an audit's output_dir (lineage audit output_dir=...)?")
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if args else 1)
    cmd, rest = args[0], args[1:]
    if cmd == "audit":
        from jobs import audit

        sys.argv = [f"{Path(sys.argv[0]).name} audit", *rest]
        audit.main()
        return
    try:
        if cmd == "show":
            from lineage.report import load_verdicts, table

            print(table(load_verdicts(_output_dir(rest))))
        elif cmd == "report":
            from lineage.report import render

            print(render(_output_dir(rest)))
        elif cmd == "certify":
            per = None
            if "--layers-per-task" in rest:
                i = rest.index("--layers-per-task")
                try:
                    per = int(rest[i + 1])
                except (IndexError, ValueError):
                    raise LineageError("--layers-per-task needs a positive number of layers") from None
                if per < 1:
                    raise LineageError("--layers-per-task needs a positive number of layers")
                rest = rest[:i] + rest[i + 2 :]
            certify(_output_dir(rest), per)
        else:
            raise LineageError(f"unknown command {cmd!r} (known: audit, show, report, certify)")
    except LineageError as e:
        print(f"lineage: error: {printable(e)}", file=sys.stderr)
        sys.exit(LineageError.exit_code)
    except OSError as e:
        print(f"lineage: error: {printable(e)}", file=sys.stderr)
        sys.exit(LineageError.exit_code)


def mergekit_yaml() -> str:
    """The mergekit-yaml executable: beside this Python's, else on PATH."""
    here = Path(sys.executable).parent / "mergekit-yaml"
    found = str(here) if here.is_file() else shutil.which("mergekit-yaml")
    if found is None:
        raise LineageError("lineage certify needs mergekit: pip install 'lineage[merge]' (or mergekit==0.1.5)")
    return found


def certify(out: Path, per: int | None = None) -> None:
    """Rerun every recipe in `out`/verdicts with mergekit into `out`/certify/SUSPECT, compare with the
    suspect, and write the certificate into the verdict (JSON) and `verdicts/SUSPECT.certificate.json`."""
    from lineage.certify import certificate, implied_density
    from lineage.output import atomic_write_bytes

    todo = []
    for f in sorted((out / "verdicts").glob("*.json")):
        if f.name.endswith(".certificate.json"):
            continue
        v = json.loads(f.read_text())
        if v.get("recipe"):
            todo.append((f, v))
    if not todo:
        print(f"{out}: no verdict has a recipe (only blends, and stacks of one model's layers, do)")
        return
    exe = mergekit_yaml()
    for f, v in todo:
        name = v["suspect"]
        rec = (v.get("sources") or {}).get(name) or {}
        src = local_source(rec)
        rerun = out / "certify" / name
        base = None
        if v.get("merge_family") in ("dare", "della") and v.get("base"):
            b = local_source((v.get("sources") or {}).get(v["base"]) or {})
            base = Path(b) if b else None
        cmp = rerun_and_compare(exe, out / v["recipe"], rerun, Path(src), base, per)
        if cmp is None:
            continue
        calibrated = None
        d = cmp.get("distribution")
        used = recipe_density(out / v["recipe"])
        if d and used is not None and d["consistent"] < d["tensors"]:
            # DARE: calibrate the density by this rerun's moved fraction, and rerun once with it
            new = implied_density(cmp, used, len(v.get("parents") or []))
            if new is not None and 0 < new <= 1 and abs(new - used) >= 0.01:
                set_density(out / v["recipe"], used, round(new, 2))
                again = rerun_and_compare(exe, out / v["recipe"], rerun, Path(src), base, per)
                if again is not None:
                    calibrated = {"from": used, "to": round(new, 2), "first_rerun": _summary(d)}
                    cmp = again
        if cmp.get("distribution"):
            cmp["distribution"].pop("all", None)
        cert = certificate(v, cmp, f"certify/{name}")
        if calibrated:
            cert["density_calibrated"] = calibrated
        v["certificate"] = cert
        atomic_write_bytes(f, (json.dumps(v, indent=2) + "\n").encode())
        atomic_write_bytes(out / "verdicts" / f"{name}.certificate.json", (json.dumps(cert, indent=2) + "\n").encode())
        print(
            f"{name}: {v.get('method')}: {cert['within_storage_rounding']}/{cert['tensors']} tensors within the storage "
            f"dtype's rounding, largest relative distance {cert['max_rel_dist']:.2g}: {cert['note']}"
        )


def local_source(rec: dict) -> str:
    """A model's folder to compare with: a local source as it is, a hub one downloaded at the commit
    the audit read (huggingface_hub's cache)."""
    src = rec.get("source", "")
    if src.startswith("hf://"):
        from lineage.remote.hub import snapshot

        return str(snapshot(src, rec.get("commit")))
    return src


def rerun_and_compare(
    exe: str, recipe: Path, rerun: Path, suspect: Path, base: Path | None, per: int | None = None
) -> dict | None:
    """Run `recipe` with mergekit into `rerun` (its output in rerun.log) and compare with the suspect;
    with `per`, as Ray tasks over ranges of at most `per` layers (jobs/certify_ray.py)."""
    from lineage.certify import compare

    if per is not None:
        from jobs.certify_ray import rerun_by_ranges

        return rerun_by_ranges(exe, recipe, suspect, base, per)

    shutil.rmtree(rerun, ignore_errors=True)
    rerun.parent.mkdir(parents=True, exist_ok=True)
    log = rerun.with_name(rerun.name + ".log")
    with open(log, "wb") as lf:
        r = subprocess.run([exe, str(recipe), str(rerun), "--no-copy-tokenizer"], stdout=lf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"{rerun.name}: mergekit failed on the recipe (exit {r.returncode}); its output is in {log}")
        return None
    return compare(rerun, suspect, base)


DENSITY = re.compile(r"^(\s+density: )([0-9.]+)\s*$", re.M)


def recipe_density(recipe: Path) -> float | None:
    """The density a recipe gives its models (the first; lineage writes one for all)."""
    m = DENSITY.search(recipe.read_text())
    return float(m.group(2)) if m else None


def set_density(recipe: Path, old: float, new: float) -> None:
    """Rewrite the recipe's densities, saying so in its header."""
    from lineage.output import atomic_write_bytes

    text = DENSITY.sub(lambda m: f"{m.group(1)}{new}", recipe.read_text())
    note = (
        f"# density {new}: calibrated by lineage certify (a rerun at {old} moved a different fraction of elements "
        "from the base than the suspect did)\n"
    )
    atomic_write_bytes(recipe, (note + text).encode())


def _summary(d: dict) -> dict:
    return {k: d[k] for k in ("tensors", "consistent", "max_kept_frac_diff", "median_kept_frac", "median_rms_ratio")}


if __name__ == "__main__":
    main()
