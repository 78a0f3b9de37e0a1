"""data=shards under faults: ``kill -9`` between checkpoints and ``resume=auto`` give the uninterrupted run's weights
and ``metrics.jsonl`` (one process, and two torchrun ranks on uneven shards, across epoch boundaries); a resume on
another number of ranks goes on from the checkpoint's step with the new layout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_records import metrics_records as _records
from shard_fixtures import uneven_shard_urls

from sparkme.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
# 16 images in shards of 5, 5, 5 and 1: 8 steps an epoch on one process, 4 on two; 11 steps cross epochs
TRAIN = ["debug=fast", "backend=torch", "trainer.device=cpu", "data=shards", "data.num_workers=2",
         "data.shuffle_buffer=3", "trainer.max_steps=11", "trainer.deterministic=true", "trainer.ckpt_every=4",
         "trainer.log_every=1", "trainer.vis_every=0", "export_formats=[]", "trainer.dist_timeout_s=60"]


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> str:
    return uneven_shard_urls(tmp_path_factory)


def _command(run_dir: Path, urls: str, ranks: int, *extra: str, port: int = 29602) -> list[str]:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                                      f"--master_port={port}"]
    return [sys.executable, *launcher, "-m", "sparkme.cli", f"run_dir={run_dir}", urls, *TRAIN, *extra]


def _start(run_dir: Path, urls: str, ranks: int, port: int = 29602) -> subprocess.Popen:
    return subprocess.Popen(_command(run_dir, urls, ranks, port=port), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _kill_at_step(run_dir: Path, step: int, process: subprocess.Popen, ranks: int) -> None:
    """Kill -9 the run (its launcher and workers) as soon as ``step`` is logged."""
    deadline = time.time() + 600
    while not any(r.get("step") == step and "loss" in r for r in _records(run_dir)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"step {step} did not appear"
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.kill()
    for pid in workers if ranks > 1 else []:
        os.kill(int(pid), signal.SIGKILL)
    process.communicate()


def _weights(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert state["step"] == 11
    return state["model"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_9_then_resume_auto_on_shards_is_bit_identical(tmp_path, urls, ranks):
    straight = _start(tmp_path / "straight", urls, ranks, port=29611)  # side by side with the victim
    victim_dir = tmp_path / "killed"
    _kill_at_step(victim_dir, 6, _start(victim_dir, urls, ranks), ranks)  # between the checkpoints of steps 4, 8
    assert straight.wait(timeout=600) == 0, straight.communicate()[1][-3000:]
    assert load_checkpoint(victim_dir / "checkpoints" / "latest.pt")["step"] == 4
    if ranks == 2:
        shutil.copytree(victim_dir, tmp_path / "one_rank")
    resumed = subprocess.run(_command(victim_dir, urls, ranks, "resume=auto"), cwd=REPO, capture_output=True,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(victim_dir) == _records(tmp_path / "straight")
    assert [r["step"] for r in _records(victim_dir)] == [0, *range(1, 12), 11]
    assert {r["epoch"] for r in _records(victim_dir) if "epoch" in r} == ({0, 1} if ranks == 1 else {0, 1, 2})
    straight_weights, resumed_weights = _weights(tmp_path / "straight"), _weights(victim_dir)
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)

    if ranks == 2:  # the same checkpoint resumed on one process: the run goes on from step 4 with the new layout
        other = subprocess.run(_command(tmp_path / "one_rank", urls, 1, "resume=auto"), cwd=REPO,
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert other.returncode == 0, other.stderr[-3000:]
        records = _records(tmp_path / "one_rank")
        assert records[:5] == _records(tmp_path / "straight")[:5]  # the log up to the checkpoint is kept
        assert [r["step"] for r in records] == [0, *range(1, 12), 11]
        # one process has 8 steps an epoch: step 5 is in epoch 0 again, read as one process reads it from there
        assert [r["epoch"] for r in records if "epoch" in r][4:] == [0, 0, 0, 0, 1, 1, 1]
