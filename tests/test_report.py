"""report.html rendered for real, in headless Chromium (Debian's `chromium`, which
`.ci/run` installs): every plot is an image that loads, the page logs no error, and
a screenshot is taken. Without Chromium on the machine the rendering test is skipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lineage.audit import run_local
from lineage.report import load_verdicts, render, table
from tests.test_resume import demo_set

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def test_report_is_self_contained(demo_root, tmp_path):
    run_local(demo_set(demo_root), tmp_path / "o")
    page = render(tmp_path / "o", "demo").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert page.count("<img") == 4 and page.count("data:image/svg+xml;base64,") == 4
    assert "rio-mini: blend" in page and "0.5700 [0.5698, 0.5702] nex-mini" in page
    assert table(load_verdicts(tmp_path / "o")).splitlines()[2].startswith("rio-mini  blend")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_chromium(demo_root, tmp_path):
    run_local(demo_set(demo_root), tmp_path / "o")
    report = render(tmp_path / "o", "demo")
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*args, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="4/4"' in dom.stdout, dom.stdout[:500]  # every image decoded, none broken
    logged = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert logged == [], logged
    shot = tmp_path / "report.png"
    r = subprocess.run(
        [*args, "--window-size=1300,2200", f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and shot.stat().st_size > 20_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def screenshot(out: Path) -> None:
    """`python -m tests.test_report OUT.png`: the README's screenshot of the demo's report."""
    import tempfile

    from lineage.demo import ensure

    with tempfile.TemporaryDirectory() as tmp:
        root = ensure(Path(tmp) / "cache")
        run_local(demo_set(root), Path(tmp) / "o")
        report = render(Path(tmp) / "o", "demo")
        subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tmp}/p", "--window-size=1300,2100", f"--screenshot={out}", report.as_uri()],
            check=True,
            capture_output=True,
            timeout=120,
        )  # type: ignore[list-item]


if __name__ == "__main__":
    import sys

    screenshot(Path(sys.argv[1]))
