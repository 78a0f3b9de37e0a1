"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor, a page missing from the nav,
an API name that no longer imports all fail it), and the README's links point at files that exist.

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
    for name in ("SparseEncoder", "build_spark", "load_weights", "export_state_dict"):
        assert name in api, f"the API reference lost {name}"


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
