"""The MinkowskiEngine sdist is fetched from pip's configured index as a file: none of its code runs.

A local index serves a fake ``MinkowskiEngine-0.5.4.tar.gz`` whose ``setup.py`` leaves a marker file and fails, as
the real one does on a machine without a system BLAS. ``pip download`` (what the installer used to do) prepares
the sdist's metadata and so runs that ``setup.py``: these tests fail on such an implementation.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from sparkme.install import minkowski
from sparkme.install.sdist import SdistError, configured_indexes, fetch_sdist

SDIST = minkowski.SDIST_NAME


def _booby_trapped_sdist(marker: Path) -> bytes:
    """A gzipped tar of ``MinkowskiEngine-0.5.4/`` whose setup.py writes ``marker`` and exits with an error."""
    setup_py = (f"open({str(marker)!r}, 'w').write('setup.py ran')\n"
                "raise SystemExit('BLAS not found from numpy.distutils.system_info.get_info')\n").encode()
    pkg_info = b"Metadata-Version: 2.1\nName: MinkowskiEngine\nVersion: 0.5.4\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("setup.py", setup_py), ("PKG-INFO", pkg_info)):
            info = tarfile.TarInfo(f"MinkowskiEngine-0.5.4/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Index(http.server.BaseHTTPRequestHandler):
    """``/simple/minkowskiengine/`` (PEP 691 JSON or PEP 503 HTML) and ``/files/<sdist>``."""

    payload = b""
    published = ""
    html = False

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.rstrip("/") == "/simple/minkowskiengine":
            if self.html:
                body = (f'<html><body><a href="../../files/{SDIST}#sha256={self.published}">{SDIST}</a>'
                        "</body></html>").encode()
                kind = "text/html"
            else:
                body = json.dumps({"files": [{"filename": SDIST, "url": f"/files/{SDIST}",
                                              "hashes": {"sha256": self.published}}]}).encode()
                kind = "application/vnd.pypi.simple.v1+json"
        elif self.path == f"/files/{SDIST}":
            body, kind = self.payload, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Serve a booby-trapped sdist; pip's index setting points at it. Yields (handler class, marker path)."""
    marker = tmp_path / "setup_py_ran"
    payload = _booby_trapped_sdist(marker)
    handler = type("Handler", (_Index,), {"payload": payload, "published": hashlib.sha256(payload).hexdigest()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setattr(minkowski, "SDIST_SHA256", handler.published)
    yield handler, marker
    server.shutdown()


@pytest.mark.parametrize("html", [False, True], ids=["pep691-json", "pep503-html"])
def test_installer_fetches_the_sdist_from_the_configured_index_without_running_its_setup_py(local_index, tmp_path,
                                                                                         html):
    handler, marker = local_index
    handler.html = html
    cache = tmp_path / "cache"
    path = minkowski._sdist(cache)
    assert path == cache / "sdist" / SDIST
    assert path.read_bytes() == handler.payload
    assert not marker.exists(), "the sdist's setup.py ran while fetching it"


def test_a_download_whose_hash_differs_from_the_published_one_is_refused_and_not_kept(local_index, tmp_path):
    handler, marker = local_index
    handler.published = "0" * 64
    target = tmp_path / "cache" / SDIST
    with pytest.raises(SdistError, match="sha256 of .* expected 0000"):
        fetch_sdist("minkowskiengine", SDIST, target)
    assert not target.exists() and not list(target.parent.glob("*partial*"))
    assert not marker.exists()


def test_a_cached_sdist_that_does_not_match_the_pinned_hash_is_fetched_again(local_index, tmp_path):
    handler, _ = local_index
    stale = tmp_path / "cache" / "sdist" / SDIST
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a truncated download")
    assert minkowski._sdist(tmp_path / "cache").read_bytes() == handler.payload


def test_an_index_without_the_file_is_reported_with_every_index_tried(tmp_path):
    empty = tmp_path / "simple"
    (empty / "minkowskiengine").mkdir(parents=True)
    (empty / "minkowskiengine" / "index.html").write_text("<html><body></body></html>")
    with pytest.raises(SdistError, match=r"not found on any configured package index: file://.*not listed"):
        fetch_sdist("minkowskiengine", SDIST, tmp_path / SDIST, indexes=[empty.as_uri()])


def test_configured_indexes_follow_pip_environment_settings(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/extra https://mirror.example/simple")
    assert configured_indexes() == ["https://mirror.example/simple", "file:///opt/extra"]
