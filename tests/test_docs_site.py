"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor, a page missing from the nav,
an API name that no longer imports all fail it), every picture a rendered page shows exists (the home page shows at
least one), and the README's links and pictures point at files that exist.

Needs the ``dev`` extra (mkdocs, mkdocs-material, mkdocstrings[python]); ``tools/setup_env.sh`` installs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")
IMG = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]+)\"")


def missing_images(site: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """For every rendered page of ``site``: the ``<img>`` sources that point at no file, and the count of images."""
    missing, counts = {}, {}
    for page in sorted(site.rglob("*.html")):
        name = str(page.relative_to(site))
        sources = [src for src in IMG.findall(page.read_text()) if not re.match(r"^(https?:|data:)", src)]
        counts[name] = len(sources)
        gone = [src for src in sources if not (page.parent / src.split("#", 1)[0]).resolve().is_file()]
        if gone:
            missing[name] = gone
    return missing, counts


def test_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                             str(REPO / "mkdocs.yml"), "-d", str(tmp_path / "site")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    # (not --quiet: it hides the warnings that --strict counts, and the build passes with them)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    for page in ("index.html", "installing/index.html", "pretraining/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SparseEncoder", "build_spark", "load_weights", "export_state_dict", "LightDecoder", "SparseMap",
                 "recipe_for", "KnnMonitor"):
        assert name in api, f"the API reference lost {name}"
    missing, counts = missing_images(tmp_path / "site")
    assert not missing, f"pages show pictures that do not exist: {missing}"
    assert counts["index.html"] >= 1, "the home page shows no picture"
    assert counts["pretraining/index.html"] >= 1 and counts["performance/index.html"] >= 1


def test_readme_links_point_at_existing_files():
    readme = (REPO / "README.md").read_text()
    missing = []
    for target in LINK.findall(readme):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path and not (REPO / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"
