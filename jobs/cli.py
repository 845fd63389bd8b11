"""The `lineage` command: `audit`, `show`, `report`.

    lineage audit [hydra overrides]     the same as `python -m jobs.audit ...`
    lineage show OUTPUT_DIR             the verdict table and explanations, from the Parquet (no Ray)
    lineage report OUTPUT_DIR           (re)writes OUTPUT_DIR/report.html and prints its path

Installed as a console script, it runs from any folder: its own directory
is not the current one, so a folder that happens to be called `lineage`
(the clone's, seen from the folder that holds it) cannot shadow the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lineage.errors import LineageError, printable

USAGE = """usage: lineage COMMAND ...

  lineage audit [hydra overrides]   audit a model set (lineage audit --help for the settings)
  lineage show OUTPUT_DIR           print an audit's verdicts and explanations again (no Ray)
  lineage report OUTPUT_DIR         write OUTPUT_DIR/report.html again and print its path

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
        else:
            raise LineageError(f"unknown command {cmd!r} (known: audit, show, report)")
    except LineageError as e:
        print(f"lineage: error: {printable(e)}", file=sys.stderr)
        sys.exit(LineageError.exit_code)
    except OSError as e:
        print(f"lineage: error: {printable(e)}", file=sys.stderr)
        sys.exit(LineageError.exit_code)


if __name__ == "__main__":
    main()
