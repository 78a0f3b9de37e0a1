"""Screenshots of the documentation site in headless Chromium, to check that it looks right (not part of CI).

    python tools/docs_screenshots.py                 # builds the site into a temporary folder, writes the PNGs
    python tools/docs_screenshots.py --out shots --pages index pretraining performance
    python tools/docs_screenshots.py --out shots --small   # 128-colour PNGs, a third of the size

Builds the site with ``mkdocs build --strict`` (the ``dev`` extra), then opens each page from disk in Debian's
``chromium`` (``apt-get install chromium``), headless, with a fresh profile and nothing that reaches the network,
and writes ``<out>/<page>.png`` at 1280x1600. Prints each PNG's path and size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,1600"]


def build_site(site: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d",
                    str(site)], cwd=REPO, env=env, check=True)


def screenshot(browser: str, page: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        page.as_uri()], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs_screenshots"), help="folder for the PNGs")
    parser.add_argument("--pages", nargs="+", default=["index", "pretraining", "performance"],
                        help="page names (docs/<name>.md), 'index' for the home page")
    parser.add_argument("--site", type=Path, help="an already built site (default: build one now)")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--small", action="store_true", help="128-colour PNGs (a third of the size) to commit")
    args = parser.parse_args(argv)
    if not shutil.which(args.browser) and not Path(args.browser).is_file():
        parser.error(f"{args.browser} not found; install it (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparkme-site-") as tmp:
        site = args.site or Path(tmp) / "site"
        if args.site is None:
            build_site(site)
        for name in args.pages:
            page = site / ("index.html" if name == "index" else f"{name}/index.html")
            if not page.is_file():
                parser.error(f"no page {page}")
            png = args.out / f"{name}.png"
            screenshot(args.browser, page.resolve(), png.resolve())
            if args.small:
                from PIL import Image

                small = Image.open(png).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
                small.save(png, optimize=True)
            print(f"{png} ({png.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
