"""Every command in the documentation runs: the fenced ``bash`` and ``python`` blocks of README.md and docs/**/*.md.

How it works (for whoever writes a guide):

* **Collected**: every fenced block whose info string is ``bash`` or ``python`` (```` ```bash ````), in README.md and
  every ``.md`` file under docs/. Use ```` ```text ```` for output, file trees and anything that is not a command.
* **Opting out**: put ``<!-- docs-test: skip (the reason) -->`` on the line before the fence (blank lines may come
  between). The reason is required; ``pytest -rs`` lists it. Skip only what cannot run on a CPU test machine in
  seconds: installs from the network, GPUs, SLURM, downloads, minutes of training.
* **Order and state**: the blocks of one file run in order, in one scratch directory that is also the working
  directory, so a block can use what an earlier block of the same file wrote (``sparkme-export`` reading the
  checkpoint of a ``sparkme-pretrain`` block above it). Files run two at a time; each file starts clean.
* **Environment**: ``HOME`` is a scratch folder holding ``~/my_images/`` (12 generated JPEGs, no labels), the
  working directory holds ``my_labelled/{train,val}/{cat,dog}/`` (4 JPEGs each), the venv's ``bin/``
  comes first on ``PATH`` (``python``, ``sparkme-*``), wandb is disabled, one thread per process.
* **Tiny sizes**: before a bash block runs, the commands below are rewritten (see ``rewrite_words``); everything
  else runs as written (``tools/...`` paths point into the checkout).

  - ``sparkme-pretrain`` (also ``python -m sparkme.cli`` and ``torchrun ... -m sparkme.cli``): ``debug=fast`` and
    ``data.num_workers=0`` are appended; ``image_size``, ``trainer.batch_size``, ``trainer.epochs`` and
    ``model.decoder_width`` overrides are dropped (debug=fast sets them); ``trainer.max_steps`` is capped at 6;
    ``data.root=...`` points at ``~/my_images``; torchrun gets ``--standalone`` and at most 2 processes. With
    ``data=volumes`` or ``experiment=spark3d_*``: ``data.root`` stays as written (a folder an earlier block of the
    guide wrote), and ``model=`` / ``data.crop_size`` become ``model=volumes/resenc_tiny data.crop_size=32``.
  - ``sparkme-bench`` / ``python tools/bench.py``: ``--models resnet18 --batch-sizes 1 --image-size 64 --repeats 1
    --warmup 0``, the first ``--ratios`` value only.
  - ``sparkme-finetune`` (no ``debug=fast`` there): ``image_size``, batch sizes, ``recipe.epochs``,
    ``trainer.max_steps`` and ``data.num_workers`` overrides are replaced by ``image_size=64 trainer.batch_size=2
    trainer.eval_batch_size=4 trainer.max_steps=2 data.num_workers=0``; ``data.root=...`` points at
    ``my_labelled/`` (``train/`` and ``val/``, classes ``cat`` and ``dog``, 4 images each, in the working
    directory).
  - ``sparkme-probe``: ``image_size``, ``batch_size``, ``num_workers``, ``knn.k`` and ``linear.{epochs,warmup_epochs,
    batch_size}`` overrides are replaced by ``image_size=64 batch_size=4 num_workers=0 knn.k=3 linear.epochs=2
    linear.warmup_epochs=1 linear.batch_size=4``; ``data.root=...`` points at ``my_labelled/``.
  - Any other command runs as written: give its block tiny sizes or skip it with a reason.

  A python block runs as a script (``python -``) in the same directory, as written: keep its sizes small.
* **Failures** name the file and the line of the block, show the block as it ran and the end of its output.
* **One guide at a time** while writing it: ``SPARKME_DOCS_ONLY=docs/x.md pytest tests/test_docs_commands.py`` (a
  comma list of paths from the checkout's root) runs that file's blocks alone and skips the others.

Budget: the whole test should stay within 2-3 minutes on 2 cores; prefer one command per idea in the guides.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = ("bash", "python")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((.+)\)\s*$")
TIMEOUT_S = 420
WORKERS = 2
TAIL_CHARS = 4000

PRETRAIN_DROPPED = ("image_size", "trainer.batch_size", "trainer.epochs", "model.decoder_width", "data.num_workers")
MAX_STEPS_CAP = 6
VOLUME_DROPPED = ("model", "data.crop_size")
VOLUME_TINY = ["model=volumes/resenc_tiny", "data.crop_size=32"]
BENCH_VALUES = {"--models": "resnet18", "--batch-sizes": "1", "--image-size": "64", "--repeats": "1", "--warmup": "0"}
HYDRA_COMMANDS = {"sparkme-pretrain"}
FINETUNE_DROPPED = ("image_size", "trainer.batch_size", "trainer.eval_batch_size", "recipe.epochs",
                    "trainer.max_steps", "data.num_workers", "trainer.progress")
PROBE_DROPPED = ("image_size", "batch_size", "num_workers", "knn.k", "linear.epochs", "linear.warmup_epochs",
                 "linear.batch_size")
PROBE_TINY = ["image_size=64", "batch_size=4", "num_workers=0", "knn.k=3", "linear.epochs=2", "linear.warmup_epochs=1",
              "linear.batch_size=4"]
FINETUNE_TINY = ["image_size=64", "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.max_steps=2",
                 "data.num_workers=0", "trainer.progress=false"]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def collect(path: Path) -> list[Block]:
    """The bash and python blocks of one markdown file, with their opt-out markers."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.group(1), match.group(2).lower()
        end = i + 1
        while end < len(lines) and not (FENCE.match(lines[end]) and FENCE.match(lines[end]).group(2) == ""):
            end += 1
        if language in LANGUAGES:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
            blocks.append(Block(path, i + 1, language, "\n".join(body) + "\n", _skip_reason(lines, i, path)))
        i = end + 1
    return blocks


def _skip_reason(lines: list[str], fence: int, path: Path) -> str | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    marker = MARKER.match(lines[j]) if j >= 0 else None
    if not marker:
        return None
    skip = SKIP.match(marker.group(1))
    if not skip:
        raise ValueError(f"{path.relative_to(REPO)}:{j + 1}: a docs-test marker must read "
                         f"'<!-- docs-test: skip (reason) -->', got {lines[j].strip()!r}")
    return skip.group(1).strip()


BLOCKS = [block for path in DOC_FILES for block in collect(path)]
ONLY = {p.strip() for p in os.environ.get("SPARKME_DOCS_ONLY", "").split(",") if p.strip()}


# --- rewriting bash commands to tiny sizes ---------------------------------------------------------------------

def _key(word: str) -> str:
    return word.split("=", 1)[0].lstrip("+~") if "=" in word and not word.startswith("-") else ""


def _hydra_tiny(args: list[str], images: Path) -> list[str]:
    # 3D volumes: data.root stays the folder an earlier block wrote; the smallest 3D model on 32^3 crops
    volumes = any(w == "data=volumes" or w.startswith("experiment=spark3d") for w in args)
    out = []
    for word in args:
        key = _key(word)
        if key in PRETRAIN_DROPPED or key == "debug" or (volumes and key in VOLUME_DROPPED):
            continue
        if key == "data.root" and not volumes:
            word = f"data.root={images}"
        elif key == "trainer.max_steps" and word.split("=", 1)[1].isdigit():
            word = f"trainer.max_steps={min(int(word.split('=', 1)[1]), MAX_STEPS_CAP)}"
        out.append(word)
    return [*out, "debug=fast", "data.num_workers=0", *(VOLUME_TINY if volumes else [])]


def _finetune_tiny(args: list[str], labelled: Path) -> list[str]:
    out = [f"data.root={labelled}" if _key(w) == "data.root" else w for w in args if _key(w) not in FINETUNE_DROPPED]
    return [*out, *FINETUNE_TINY]


def _probe_tiny(args: list[str], labelled: Path) -> list[str]:
    out = [f"data.root={labelled}" if _key(w) == "data.root" else w for w in args if _key(w) not in PROBE_DROPPED]
    return [*out, *PROBE_TINY]


def _bench_tiny(args: list[str]) -> list[str]:
    out, i, seen = [], 0, set()
    while i < len(args):
        word = args[i]
        name, _, inline = word.partition("=")
        value = inline if inline else (args[i + 1] if i + 1 < len(args) and name in (*BENCH_VALUES, "--ratios")
                                       else None)
        step = 1 if inline or value is None else 2
        if name in BENCH_VALUES:
            out += [name, BENCH_VALUES[name]]
            seen.add(name)
        elif name == "--ratios" and value:
            out += [name, value.split(",")[0]]
        else:
            out += args[i:i + step]
        i += step
    for name, value in BENCH_VALUES.items():
        if name not in seen:
            out += [name, value]
    return out


def _torchrun_tiny(args: list[str]) -> list[str]:
    out = ["--standalone"] if not any(a.startswith(("--rdzv", "--master", "--standalone", "--nnodes")) for a in args) \
        else []
    for word in args:
        name, _, value = word.partition("=")
        if name in ("--nproc_per_node", "--nproc-per-node") and value.isdigit():
            word = f"{name}={min(int(value), 2)}"
        out.append(word)
    return out


def rewrite_words(words: list[str], images: Path, labelled: Path) -> list[str]:
    """One simple command (no shell operators) at tiny sizes; see the module docstring."""
    env = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        env.append(words.pop(0))
    words = [str(REPO / w) if w.startswith("tools/") else w for w in words]
    if not words:
        return env
    name = Path(words[0]).name
    if name in HYDRA_COMMANDS:
        words = [words[0], *_hydra_tiny(words[1:], images)]
    elif name in ("python", "python3") and words[1:3] == ["-m", "sparkme.cli"]:
        words = [*words[:3], *_hydra_tiny(words[3:], images)]
    elif name == "torchrun" and "-m" in words:
        at = words.index("-m")
        words = [words[0], *_torchrun_tiny(words[1:at]), *words[at:at + 2], *_hydra_tiny(words[at + 2:], images)]
    elif name == "sparkme-finetune":
        words = [words[0], *_finetune_tiny(words[1:], labelled)]
    elif name == "sparkme-probe":
        words = [words[0], *_probe_tiny(words[1:], labelled)]
    elif name == "sparkme-bench":
        words = [words[0], *_bench_tiny(words[1:])]
    elif name in ("python", "python3") and len(words) > 1 and words[1].endswith("tools/bench.py"):
        words = [*words[:2], *_bench_tiny(words[2:])]
    return env + words


def rewrite_bash(text: str, home: Path, labelled: Path | None = None) -> str:
    """The block with every command rewritten to tiny sizes and ``~`` expanded to the scratch home."""
    images, labelled = home / "my_images", labelled or home.parent / "my_labelled"
    logical = re.sub(r"\\\n\s*", " ", text).splitlines()
    out = []
    for line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        pieces, segment = [], []
        for token in [*tokens, ";"]:
            if token and set(token) <= set("();<>|&"):
                if segment:
                    words = [re.sub(r"(^|=)~(?=/|$)", lambda m: m.group(1) + str(home), w) for w in segment]
                    pieces.append(shlex.join(rewrite_words(words, images, labelled)))
                    segment = []
                pieces.append(token)
            else:
                segment.append(token)
        out.append(" ".join(pieces[:-1]))
    return "\n".join(line for line in out if line.strip()) + "\n"


# --- running ---------------------------------------------------------------------------------------------------

def _make_images(folder: Path, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (80 + 8 * (i % 3), 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.jpg")


def _environment(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HOME=str(home), WANDB_MODE="disabled", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return env


@dataclass
class Result:
    ran: str
    returncode: int
    output: str
    seconds: float


def _run_file(blocks: list[Block], root: Path) -> dict[str, Result]:
    work = root / re.sub(r"\W", "_", str(blocks[0].path.relative_to(REPO)))
    home = work / "home"
    _make_images(home / "my_images", 12)
    for seed, (split, label) in enumerate((s, c) for s in ("train", "val") for c in ("cat", "dog")):
        _make_images(work / "my_labelled" / split / label, 4, seed + 1)
    env = _environment(home)
    results = {}
    for block in blocks:
        if block.skip_reason:
            continue
        if block.language == "bash":
            ran = rewrite_bash(block.text, home, work / "my_labelled")
            command = ["bash", "-eo", "pipefail", "-c", ran]
            stdin = None
        else:
            ran = block.text
            command, stdin = [sys.executable, "-"], block.text
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=work, env=env, input=stdin, capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
            returncode, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            returncode = -1
            output = f"timed out after {TIMEOUT_S} s\n{error.stdout or ''}{error.stderr or ''}"
        results[block.where] = Result(ran, returncode, output, time.perf_counter() - start)
        if returncode != 0:
            break  # later blocks of this file may depend on this one
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory, request) -> dict[str, Result]:
    """Runs every file's blocks (files in parallel, blocks of a file in order) once; keyed by ``Block.where``.
    Prints each block's time and the total CPU time of the commands (the budget is 2-3 minutes on 2 idle cores)."""
    root = tmp_path_factory.mktemp("docs_commands")
    start, cpu = time.perf_counter(), _children_cpu_s()
    by_file: dict[Path, list[Block]] = {}
    for block in BLOCKS:
        by_file.setdefault(block.path, []).append(block)
    runnable = [blocks for path, blocks in by_file.items() if any(not b.skip_reason for b in blocks)
                and (not ONLY or str(path.relative_to(REPO)) in ONLY)]
    runnable.sort(key=lambda blocks: -sum(not b.skip_reason for b in blocks))  # longest first
    merged: dict[str, Result] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for part in pool.map(lambda blocks: _run_file(blocks, root), runnable):
            merged.update(part)
    lines = [f"docs command {where}: {result.seconds:.0f} s, exit status {result.returncode}"
             for where, result in sorted(merged.items(), key=lambda item: -item[1].seconds)]
    lines.append(f"docs commands: {len(merged)} blocks in {time.perf_counter() - start:.0f} s wall, "
                 f"{_children_cpu_s() - cpu:.0f} s CPU")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
    return merged


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_documented_block_runs(block: Block, results: dict[str, Result]):
    if block.skip_reason:
        pytest.skip(f"{block.where}: {block.skip_reason}")
    if ONLY and str(block.path.relative_to(REPO)) not in ONLY:
        pytest.skip(f"{block.where}: not in SPARKME_DOCS_ONLY")
    if block.where not in results:
        pytest.fail(f"{block.where}: not run, because an earlier block of {block.path.name} failed")
    result = results[block.where]
    assert result.returncode == 0, (
        f"{block.where}: the {block.language} block failed (exit status {result.returncode}, "
        f"{result.seconds:.0f} s)\n--- as written ---\n{block.text}--- as run ---\n{result.ran}"
        f"--- output (end) ---\n{result.output[-TAIL_CHARS:]}")


def test_blocks_are_collected_and_markers_well_formed():
    """The collector sees the guides (a silent zero would pass everything) and every skip gives a reason."""
    assert len([b for b in BLOCKS if not b.skip_reason]) >= 10, [b.where for b in BLOCKS]
    assert all(b.skip_reason for b in BLOCKS if b.text.lstrip().startswith("bash tools/test.sh"))


def test_blocks_skipped_as_copies_of_the_readme_are_copies():
    """A block skipped because README.md runs the same one must stay the same as it."""
    readme = {b.text for b in BLOCKS if b.path.name == "README.md" and b.path.parent == REPO}
    copies = [b for b in BLOCKS if b.skip_reason and "as README.md's" in b.skip_reason]
    assert all(b.text in readme for b in copies), [b.where for b in copies if b.text not in readme]


def test_rewrite_makes_commands_tiny(tmp_path):
    ran = rewrite_bash("sparkme-pretrain data=imagefolder data.root=~/my_images image_size=224 "
                       "trainer.batch_size=64 \\\n    trainer.max_steps=1000  # comment\n"
                       "sparkme-bench --models resnet50,convnext_small --ratios 0.6,0.75 --batch-sizes 8\n", tmp_path)
    first, second = ran.splitlines()
    assert shlex.split(first) == ["sparkme-pretrain", "data=imagefolder", f"data.root={tmp_path}/my_images",
                                  "trainer.max_steps=6", "debug=fast", "data.num_workers=0"]
    assert shlex.split(second) == ["sparkme-bench", "--models", "resnet18", "--ratios", "0.6", "--batch-sizes", "1",
                                   "--image-size", "64", "--repeats", "1", "--warmup", "0"]
    torchrun = shlex.split(rewrite_bash("torchrun --nproc_per_node=8 -m sparkme.cli model=resnet50 && echo ok\n",
                                        tmp_path))
    assert torchrun[:5] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "sparkme.cli"]
    assert torchrun[-5:] == ["debug=fast", "data.num_workers=0", "&&", "echo", "ok"]
    finetune = shlex.split(rewrite_bash("sparkme-finetune model=resnet50 init=a.pt data.root=my_labelled "
                                        "trainer.batch_size=64 recipe.epochs=30\n", tmp_path, tmp_path / "lab"))
    assert finetune == ["sparkme-finetune", "model=resnet50", "init=a.pt", f"data.root={tmp_path}/lab",
                        "image_size=64", "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.max_steps=2",
                        "data.num_workers=0", "trainer.progress=false"]
