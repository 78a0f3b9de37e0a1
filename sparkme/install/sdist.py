"""Fetch a source distribution from the configured package index without running any of its code.

``pip download`` of an sdist prepares its metadata, i.e. runs the sdist's ``setup.py``. MinkowskiEngine's looks for a
system BLAS there and fails on machines without one, before the project's patches can apply. This module reads the
index's project page (PEP 691 JSON, or PEP 503 HTML), takes the file's URL and published sha256 from it, downloads
the bytes and checks the hash. Nothing of the sdist is executed.

The index is pip's own configuration: ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL``, else ``pip config``'s
``index-url`` / ``extra-index-url``, else PyPI. Each index is tried in turn; ``file://`` indexes work too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_INDEX = "https://pypi.org/simple"
_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"


class SdistError(RuntimeError):
    """The sdist could not be found on any configured index, or its bytes do not match the published hash."""


def _pip_config_value(name: str) -> list[str]:
    """Values of ``pip config``'s ``<section>.<name>`` (global, install, download), whitespace-separated lists."""
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    values: list[str] = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.split(".")[-1] == name and not key.startswith(":env:"):
            values += value.strip().strip("'\"").split()
    return values


def configured_indexes() -> list[str]:
    """pip's index URL first, then its extra index URLs, in the order pip itself would read them."""
    primary = os.environ.get("PIP_INDEX_URL", "").split() or _pip_config_value("index-url") or [DEFAULT_INDEX]
    extra = os.environ.get("PIP_EXTRA_INDEX_URL", "").split() or _pip_config_value("extra-index-url")
    return list(dict.fromkeys(primary[:1] + extra))


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


class _AnchorParser(HTMLParser):
    """Collects ``(filename, href)`` of every ``<a>`` in a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _project_page(index: str, project: str) -> tuple[str, str, str]:
    """Return (page URL, content type, body) of ``project`` on ``index``."""
    url = index.rstrip("/") + "/" + _normalise(project) + "/"
    if url.startswith("file:"):  # a local PEP 503 tree: the project page is a folder's index.html
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        page = path / "index.html"
        return page.as_uri(), "text/html", page.read_text()
    request = urllib.request.Request(url, headers={"Accept": _ACCEPT})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.geturl(), response.headers.get("Content-Type", ""), response.read().decode()


def find_file(index: str, project: str, filename: str) -> tuple[str, str | None]:
    """Return (absolute download URL, published sha256 or None) of ``filename`` on one index's project page.

    Raises:
        SdistError: the page lists no such file.
        OSError: the page could not be read (urllib errors are OSErrors).
    """
    page_url, content_type, body = _project_page(index, project)
    if "json" in content_type:
        files = [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]]
    else:
        parser = _AnchorParser()
        parser.feed(body)
        files = []
        for name, href in parser.links:
            url, _, fragment = href.partition("#")
            digest = dict(part.split("=", 1) for part in fragment.split("&") if "=" in part).get("sha256")
            files.append((name, url, digest))
    for name, url, digest in files:
        if name.lower() == filename.lower():
            return urllib.parse.urljoin(page_url, url), digest
    raise SdistError(f"{filename} is not listed at {page_url}")


def _download(url: str, target: Path) -> str:
    """Stream ``url`` into ``target`` and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch_sdist(project: str, filename: str, target: Path, pinned_sha256: str | None = None,
                indexes: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    """Download ``filename`` of ``project`` to ``target`` (atomically) and verify its sha256.

    Args:
        project: project name on the index, e.g. ``"minkowskiengine"``.
        filename: the file to fetch, e.g. ``"MinkowskiEngine-0.5.4.tar.gz"``.
        target: final path; written only once the bytes are verified.
        pinned_sha256: the hash the project expects; checked in addition to the index's published hash.
        indexes: index URLs to try in order (default: pip's configuration, see ``configured_indexes``).
        log: progress messages.

    Raises:
        SdistError: no index lists the file, or the downloaded bytes match neither hash.
    """
    tried = []
    for index in indexes or configured_indexes():
        try:
            url, published = find_file(index, project, filename)
        except (OSError, SdistError, ValueError, KeyError) as error:
            tried.append(f"{index} ({error})")
            continue
        expected = {h for h in (published, pinned_sha256) if h}
        if not expected:
            raise SdistError(f"{url} has no published sha256 and none is pinned: refusing an unverifiable download")
        log(f"downloading {url}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
        os.close(fd)
        try:
            actual = _download(url, Path(partial))
            if expected != {actual}:
                raise SdistError(f"sha256 of {url} is {actual}, expected {' and '.join(sorted(expected))}")
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
        return target
    raise SdistError(f"{filename} not found on any configured package index: " + "; ".join(tried))
