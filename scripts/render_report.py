"""Screenshot report pages with headless Chromium, for the docs and for looking at them.

    .venv/bin/python scripts/render_report.py OUT/slides/P01_post/report.html --out docs/images/report_slide.png
    .venv/bin/python scripts/render_report.py OUT/report.html --out docs/images/report_cohort.png --height 2400

Needs the Debian package ``chromium`` (``apt-get install chromium``); the tests never do.
Chromium runs offline (no network, a throw-away profile), so a page that showed anything
here shows it offline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def render(html: Path, png: Path, *, width: int = 1400, height: int = 2400, browser: str | None = None) -> Path:
    """Screenshot ``html`` (its top ``width`` x ``height`` CSS pixels) into ``png``."""
    browser = browser or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install chromium")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such page")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", "--disable-extensions", "--disable-background-networking",
                   # Any request off the machine fails: the page must need none.
                   "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                   f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                   html.as_uri()]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {html}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    print(render(args.html, args.out, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
