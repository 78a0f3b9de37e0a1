"""Build, cache and install MinkowskiEngine 0.5.4 for the running torch (``sparkme-install-minkowski``).

PyPI only carries the 0.5.4 source distribution (May 2021). It does not import on Python >= 3.10 and its
``setup.py`` deletes ``build/`` and uninstalls MinkowskiEngine each time it runs. The sdist is fetched from pip's
configured package index without running any of its code (``sdist.py``; its hash is checked). This tool then
applies the project's own small patches (among them ``--blas=aten``: the CPU kernels' gemm/axpy run on torch's own
BLAS, so no system BLAS is needed), builds a wheel once, caches it outside the repository keyed by
(MinkowskiEngine version, torch version, CPU/CUDA variant, Python tag) and installs it. A second run only installs
the cached wheel (seconds); a run where the right build is already installed does nothing.

Usage (``python tools/install_minkowski.py`` in a checkout is the same command)::

    sparkme-install-minkowski                  # CPU build (CUDA build when torch sees a GPU)
    sparkme-install-minkowski --device cuda --cuda-arch 9.0   # CUDA build, GPU not needed
    sparkme-install-minkowski --build-only     # build and cache the wheel, do not install

Environment: ``SPARKME_CACHE`` (default ``~/.cache/sparkme``) holds ``minkowski/<key>/*.whl`` and the sdist.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from sparkme.install.minkowski_patches import CPU_PATCHES, CUDA_PATCHES, apply_patches
from sparkme.install.sdist import SdistError, fetch_sdist

ME_VERSION = "0.5.4"
SDIST_NAME = f"MinkowskiEngine-{ME_VERSION}.tar.gz"
# PyPI's published sha256 of the 0.5.4 sdist (2021-05-21); checked besides the hash the index publishes.
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
MARKER = "SPARKME_BUILD_KEY"  # written into the installed package: which cached build is installed


class InstallError(RuntimeError):
    """A prerequisite is missing or a build step failed; the message says how to fix it."""


def log(message: str) -> None:
    print(f"[install_minkowski {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, env=env)
    if result.returncode != 0:
        raise InstallError(f"command failed with exit code {result.returncode}: {' '.join(cmd)}")


def ensure_compiler() -> None:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise InstallError(
            "no C++ compiler found (looked for $CXX or g++). Install one with `sudo apt-get install g++` "
            "or `conda install -c conda-forge gxx_linux-64`."
        )


def torch_info() -> tuple[str, str | None, bool]:
    """Return (torch version, torch's CUDA version or None, whether a GPU is visible)."""
    try:
        import torch
    except ImportError as error:
        raise InstallError(
            "torch is not importable in this Python "
            f"({sys.executable}): install it first, e.g. `pip install torch==2.14.1 torchvision==0.29.1`"
        ) from error
    return torch.__version__, torch.version.cuda, torch.cuda.is_available()


def patches_for(variant: str) -> list:
    return CPU_PATCHES + (CUDA_PATCHES if variant != "cpu" else [])


def cache_key(torch_version: str, variant: str) -> str:
    """Cache folder name: every input that makes a wheel incompatible is part of it (only the patches that the
    variant's build applies, so editing CUDA patches never invalidates cached CPU wheels)."""
    py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    patch_digest = hashlib.sha256(repr(patches_for(variant)).encode()).hexdigest()[:10]
    return f"me{ME_VERSION}-torch{torch_version.replace('+', '_')}-{variant}-{py_tag}-p{patch_digest}"


def _installed_package_dir() -> Path | None:
    """Folder of the installed MinkowskiEngine package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("MinkowskiEngine")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def installed_marker() -> str | None:
    """The cache key recorded next to the installed MinkowskiEngine, or None when it is missing or not ours."""
    package = _installed_package_dir()
    marker = package / MARKER if package is not None else None
    return marker.read_text().strip() if marker is not None and marker.exists() else None


def _setup_py_env(**extra: str) -> dict:
    """Environment for running the sdist's ``setup.py``. It was written against the stdlib distutils; Python 3.12
    removed that, and there setuptools' own copy is the only one (asking for "stdlib" would break every import)."""
    env = dict(os.environ, **extra)
    if sys.version_info < (3, 12):
        env["SETUPTOOLS_USE_DISTUTILS"] = "stdlib"
    return env


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sdist(cache: Path) -> Path:
    """The verified sdist in the cache, fetched from the package index the first time. Only the file is
    downloaded: none of its code runs (``pip download`` would run its ``setup.py``, which needs a system BLAS)."""
    target = cache / "sdist" / SDIST_NAME
    if target.exists() and _sha256(target) == SDIST_SHA256:
        return target
    try:
        return fetch_sdist("minkowskiengine", SDIST_NAME, target, pinned_sha256=SDIST_SHA256, log=log)
    except SdistError as error:
        raise InstallError(f"{error}. On an offline machine, carry {SDIST_NAME} into {target.parent}") from error


def _cuda_home() -> str:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and Path(candidate, "bin", "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    raise InstallError("CUDA build requested but nvcc was not found: set CUDA_HOME or put nvcc on PATH")


def build_wheel(cache: Path, key: str, variant: str, jobs: int, cuda_arch: str | None) -> Path:
    """Patch the sdist in a temporary folder and build a wheel into ``cache/key``."""
    ensure_compiler()
    for module in ("numpy", "setuptools", "wheel", "ninja"):
        try:
            __import__(module)
        except ImportError:
            _run([sys.executable, "-m", "pip", "install", "-q", module])
    sdist = _sdist(cache)
    out_dir = cache / key
    with tempfile.TemporaryDirectory(prefix="sparkme-me-build-") as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"MinkowskiEngine-{ME_VERSION}"
        for line in apply_patches(source, patches_for(variant)):
            log(line)
        env = _setup_py_env(MAX_JOBS=str(jobs))
        # --blas=aten (a project patch): MinkowskiEngine's CPU gemm/axpy run on torch's own BLAS, no system BLAS
        args = [sys.executable, "setup.py", "bdist_wheel", "--blas=aten"]
        if variant == "cpu":
            args.append("--cpu_only")
        else:
            cuda_home = _cuda_home()
            env["CUDA_HOME"] = cuda_home
            env["TORCH_CUDA_ARCH_LIST"] = cuda_arch or env.get("TORCH_CUDA_ARCH_LIST", "9.0")
            args += ["--force_cuda", f"--cuda_home={cuda_home}"]
        started = time.time()
        _run(args, cwd=source, env=env)
        wheels = list((source / "dist").glob("*.whl"))
        if len(wheels) != 1:
            raise InstallError(f"expected one wheel in {source / 'dist'}, found {wheels}")
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / (wheels[0].name + ".partial")
        shutil.copy2(wheels[0], partial)
        final = out_dir / wheels[0].name
        os.replace(partial, final)  # a killed build never leaves a half-written wheel in the cache
    log(f"built {final.name} in {time.time() - started:.0f} s ({final.stat().st_size / 2**20:.1f} MiB)")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA build when torch sees a GPU, else CPU build")
    parser.add_argument("--cuda-arch", default=None, help="TORCH_CUDA_ARCH_LIST for a CUDA build, e.g. '9.0'")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    parser.add_argument("--cache-dir", default=os.environ.get("SPARKME_CACHE", str(Path.home() / ".cache/sparkme")))
    parser.add_argument("--build-only", action="store_true", help="build and cache the wheel without installing")
    parser.add_argument("--rebuild", action="store_true", help="ignore a cached wheel")
    parser.add_argument("--fetch-sdist", action="store_true",
                        help="only download the sdist into the cache (to carry to an offline machine), then stop")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() / "minkowski"
    if args.fetch_sdist:
        log(f"sdist at {_sdist(cache)}")
        return 0

    started = time.time()
    torch_version, torch_cuda, gpu_visible = torch_info()
    want_cuda = args.device == "cuda" or (args.device == "auto" and gpu_visible)
    if want_cuda and torch_cuda is None:
        raise InstallError(f"CUDA build requested but torch {torch_version} is a CPU-only build")
    variant = f"cu{torch_cuda.replace('.', '')}-sm{(args.cuda_arch or '9.0').replace('.', '')}" if want_cuda else "cpu"
    key = cache_key(torch_version, variant)
    log(f"torch {torch_version}, variant {variant}, cache key {key}")

    if not args.build_only and not args.rebuild and installed_marker() == key:
        log(f"MinkowskiEngine {ME_VERSION} ({key}) already installed; nothing to do ({time.time() - started:.1f} s)")
        return 0
    cached = sorted((cache / key).glob("*.whl"))
    if cached and not args.rebuild:
        wheel = cached[0]
        log(f"using cached wheel {wheel}")
    else:
        wheel = build_wheel(cache, key, variant, args.jobs, args.cuda_arch)
    if not args.build_only:
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
        _run([sys.executable, "-c", "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'ok')"],
             cwd=Path(tempfile.gettempdir()))
        (_installed_package_dir() / MARKER).write_text(key + "\n")  # lets the next run skip the reinstall
    log(f"done in {time.time() - started:.1f} s")
    return 0


def cli() -> None:
    """Console entry point: a failed prerequisite is one line and exit status 2."""
    try:
        sys.exit(main())
    except InstallError as error:
        print(f"sparkme-install-minkowski: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
