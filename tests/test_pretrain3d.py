"""A short 3-D SparK pretraining run on generated volumes: the held-out loss falls, and a run killed with SIGKILL
between checkpoints and continued with ``resume=auto`` ends with the uninterrupted run's log and weights, bit for bit.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_records import metrics_records as _records
from run_records import wait_for_step

from sparkme.data.volumes_synthetic import write_blob_volumes
from sparkme.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
STEPS = 9
# A learning rate at which nine steps of the test ResEnc visibly learn (lr = base_lr x batch / 256), no warm-up.
COMMON = ("data=volumes", "data.crop_size=32", "data.num_workers=0", "data.holdout_volumes=1",
          "model=volumes/resenc_tiny", "backend=torch", "trainer.deterministic=true", f"trainer.max_steps={STEPS}",
          "trainer.ckpt_every=4", "trainer.log_every=1", "trainer.vis_every=0", "optim.optimizer.compile=false",
          "optim.base_lr=0.5", "sched.warmup_epochs=0", "data.export_formats=[]")


def _cli(run_dir: Path, root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sparkme.cli", "debug=fast", *COMMON, f"data.root={root}", f"run_dir={run_dir}",
            *overrides]


@pytest.mark.slow
def test_3d_pretraining_learns_and_kill_9_then_resume_auto_is_bit_identical(tmp_path):
    root = tmp_path / "volumes"
    write_blob_volumes(root, 4, (40, 40, 40))  # one held out
    straight = subprocess.Popen(_cli(tmp_path / "straight", root), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim_dir = tmp_path / "killed"
    victim = subprocess.Popen(_cli(victim_dir, root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    kill_after = random.choice([5, 6])  # between the checkpoints of steps 4 and 8
    wait_for_step(victim_dir, kill_after, victim, timeout=900)
    assert victim.poll() is None, "the victim finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert load_checkpoint(victim_dir / "checkpoints" / "latest.pt")["step"] == 4

    resumed = subprocess.run(_cli(victim_dir, root, "resume=auto"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=900) == 0, straight.communicate()[1][-3000:]
    assert _records(victim_dir) == _records(tmp_path / "straight"), f"killed after step {kill_after}"
    final = {d.name: load_checkpoint(d / "checkpoints" / "latest.pt") for d in (tmp_path / "straight", victim_dir)}
    assert final["killed"]["step"] == final["straight"]["step"] == STEPS
    assert all(torch.equal(final["straight"]["model"][k], final["killed"]["model"][k])
               for k in final["straight"]["model"])

    held_out = [r["holdout_loss"] for r in _records(tmp_path / "straight") if "holdout_loss" in r]
    assert len(held_out) == 2 and held_out[1] < held_out[0], held_out  # at step 0 and after the last step
