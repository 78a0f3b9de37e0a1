"""End to end on generated volumes plus nibabel's bundled files: ``sparkme-pretrain data=volumes``, stopped by
SIGTERM and continued with ``resume=auto`` (log, weights and pictures equal to an uninterrupted run), the run's
nnU-Net export accepted by nnunetv2's own loader, ``sparkme-export`` of both 3D formats, MONAI's strict load, and
bad input at start-up as one line with exit status 2."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from monai.networks import nets
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from run_records import metrics_records as _records
from run_records import wait_for_step
from test_volumes_export import _plans_network

from sparkme.data.volumes_synthetic import write_blob_volumes
from sparkme.engine.checkpoint import load_checkpoint
from sparkme.export import main as export_main
from sparkme.files import read_torch_file
from sparkme.models.volumes import RESENC_TINY

REPO = Path(__file__).resolve().parent.parent
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
COMMON = ("data=volumes", "data.crop_size=32", "data.num_workers=0", "data.channel_mode=split",
          "data.holdout_volumes=1", "model=volumes/resenc_tiny", "backend=torch", "trainer.deterministic=true",
          "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.log_every=1", "trainer.vis_every=2",
          "optim.optimizer.compile=false")


def _volume_folder(folder: Path) -> Path:
    """Three generated blob volumes, nibabel's anatomical.nii (33x41x25, int16) and example4d.nii.gz (two
    128x96x24 channels, split into two items)."""
    write_blob_volumes(folder, 3, (40, 40, 40))
    for name in ("anatomical.nii", "example4d.nii.gz"):
        (folder / name).write_bytes((NIBABEL_DATA / name).read_bytes())
    return folder


def _cli(run_dir: Path, root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sparkme.cli", "debug=fast", *COMMON, f"data.root={root}", f"run_dir={run_dir}",
            *overrides]


@pytest.mark.slow
def test_pretrain_sigterm_resume_export_and_hand_off(tmp_path):
    root = _volume_folder(tmp_path / "volumes")
    straight = subprocess.Popen(_cli(tmp_path / "straight", root), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim_dir = tmp_path / "stopped"
    victim = subprocess.Popen(_cli(victim_dir, root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for_step(victim_dir, 1, victim)
    victim.send_signal(signal.SIGTERM)
    stdout, stderr = victim.communicate(timeout=600)
    assert victim.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stdout + stderr
    stopped_at = load_checkpoint(victim_dir / "checkpoints" / "latest.pt")["step"]
    assert 1 <= stopped_at < 4

    resumed = subprocess.run(_cli(victim_dir, root, "resume=auto"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=600) == 0, straight.communicate()[1][-3000:]
    assert _records(victim_dir) == _records(tmp_path / "straight")
    final = {d.name: load_checkpoint(d / "checkpoints" / "latest.pt") for d in (tmp_path / "straight", victim_dir)}
    assert final["stopped"]["step"] == final["straight"]["step"] == 4
    assert all(torch.equal(final["straight"]["model"][k], final["stopped"]["model"][k])
               for k in final["straight"]["model"])
    pictures = {d.name: {p.name: p.read_bytes() for p in (d / "reconstructions").glob("*.png")}
                for d in (tmp_path / "straight", victim_dir)}
    assert sorted(pictures["stopped"]) == ["step_0000002.png", "step_0000004.png"]
    assert pictures["stopped"] == pictures["straight"]

    # the run's own export (data.export_formats null: nnunet for resenc_*) is what sparkme-export writes
    run_export = victim_dir / "export" / "resenc_tiny_nnunet.pt"
    assert export_main([f"ckpt={victim_dir / 'checkpoints' / 'latest.pt'}", "format=nnunet",
                        f"out={tmp_path / 'cli_nnunet.pt'}"]) == 0
    from_cli = read_torch_file(tmp_path / "cli_nnunet.pt")["network_weights"]
    from_run = read_torch_file(run_export)["network_weights"]
    assert all(torch.equal(from_cli[k], from_run[k]) for k in from_run)
    network = _plans_network(RESENC_TINY, in_chans=1, classes=4)
    load_pretrained_weights(network, str(run_export))
    trained = final["stopped"]["model"]
    first_conv = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(network.state_dict()[first_conv], trained[[k for k in trained
                                                                 if k.endswith("stem.convs.0.conv.weight")][0]])


@pytest.mark.slow
def test_monai_resnet_pretrains_and_its_export_loads_strictly(tmp_path):
    from hydra import compose, initialize_config_dir

    from sparkme.cli import CONFIG_DIR
    from sparkme.engine.pretrain import pretrain

    root = tmp_path / "volumes"
    write_blob_volumes(root, 2, (64, 64, 64))
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["debug=fast", "data=volumes", f"data.root={root}", "data.crop_size=64",
                                           "data.num_workers=0", "model=volumes/monai_resnet10", "backend=torch",
                                           "trainer.max_steps=1", "trainer.vis_every=0",
                                           "optim.optimizer.compile=false",
                                           f"run_dir={tmp_path / 'run'}"])
    summary = pretrain(cfg)
    state = read_torch_file(summary["export_monai"])
    model = nets.resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, conv1_t_stride=2)
    model.load_state_dict(state, strict=True)
    trained = read_torch_file(tmp_path / "run" / "checkpoints" / "latest.pt")["model"]
    assert torch.equal(model.conv1.weight, trained[[k for k in trained if k.endswith("conv1.weight")][0]])


def test_bad_volumes_end_in_one_line_and_exit_2(tmp_path):
    """The command's path for bad volumes (every case is tested on the checks themselves in test_volumes_data):
    a volume thinner than the model's mask block, found with the model's patch size at start-up."""
    root = tmp_path / "volumes"
    root.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.ones((64, 64, 8), np.float32), np.eye(4)), str(root / "thin.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "sparkme.cli", "data=volumes", f"data.root={root}",
                             "model=volumes/resenc_tiny", "data.crop_size=32", f"run_dir={tmp_path / 'run'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-pretrain: error: data.root: ") \
        and "smaller than the model's mask block of 16 voxels" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
