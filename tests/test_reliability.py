"""Bad input gets one clear error; faults lose nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image
from run_records import metrics_records as _records
from run_records import wait_for_step

from sparkme.cli import CONFIG_DIR
from sparkme.data import ImageFolderDataset
from sparkme.engine import pretrain as engine
from sparkme.engine.checkpoint import check_compatible, load_checkpoint, save_atomic
from sparkme.engine.distributed import DistInfo
from sparkme.engine.logging import MetricsLogger, truncate_metrics
from sparkme.models import build_spark, create_backbone
from sparkme.sparse import get_backend

REPO = Path(__file__).resolve().parent.parent


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sparkme.cli", "debug=fast", "backend=torch", f"run_dir={run_dir}", *overrides]


# --- bad input ---------------------------------------------------------------------------------------------------
def test_unknown_model_lists_what_is_supported():
    with pytest.raises(ValueError, match="unknown model 'vgg16': sparkme supports ResNets"):
        create_backbone("vgg16")
    with pytest.raises(ValueError, match="unknown model 'convnext_gigantic': timm has no such model"):
        create_backbone("convnext_gigantic")


def test_unknown_backend_and_missing_library_messages(monkeypatch):
    with pytest.raises(ValueError, match="choose one of minkowski, torch, masked"):
        get_backend("spconv")
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # simulate a machine without MinkowskiEngine
    monkeypatch.delitem(sys.modules, "sparkme.sparse.minkowski_backend", raising=False)
    with pytest.raises(ImportError, match="tools/install_minkowski.py"):
        get_backend("minkowski")


def test_cli_errors_name_the_bad_value(tmp_path):
    cases = {
        ("mask_ratio=1.0",): "mask ratio must be in [0, 1)",
        ("image_size=100",): "image size 100x100 is not supported",
        ("trainer.batch_size=0",): "trainer.batch_size must be an integer >= 1, got 0",
        ("optim=sgdx",): "unknown optim 'sgdx'; choose one of adamw, lamb",
        ("data=imagefolder", f"data.root={tmp_path}/missing"): "does not exist or is not a directory",
    }
    for overrides, message in cases.items():
        result = subprocess.run(_cli(tmp_path / "run", *overrides), cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0
        assert message in result.stderr + result.stdout, (overrides, result.stderr[-2000:])


def test_image_folder_converts_modes_skips_bad_files_and_aborts_past_the_limit(tmp_path, caplog):
    Image.new("L", (20, 20), 7).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 20)).save(tmp_path / "alpha.png")
    Image.new("I;16", (20, 20), 40000).save(tmp_path / "deep.png")
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "small.jpg")  # smaller than any crop: resized by the crop
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dataset = ImageFolderDataset(str(tmp_path), transform=lambda image: image, max_bad_fraction=0.5)
    images = [dataset[i] for i in range(len(dataset))]
    assert len(images) == 5 and all(image.mode == "RGB" for image in images)
    assert dataset.bad == {dataset.files.index(tmp_path / "broken.jpg")}  # replaced by the next readable image
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 1
    strict = ImageFolderDataset(str(tmp_path), transform=lambda image: image, max_bad_fraction=0.0)
    with pytest.raises(RuntimeError, match="1 of 5 files .* could not be read, more than data.max_bad_fraction=0.0"):
        strict[strict.files.index(tmp_path / "broken.jpg")]


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no image files"):
        ImageFolderDataset(str(tmp_path), transform=None)


# --- checkpoints -------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_model_names_the_mismatch():
    resnet = build_spark("resnet18", "torch", decoder_width=32).state_dict()
    convnext = build_spark("convnext_atto", "torch", decoder_width=32).state_dict()
    with pytest.raises(ValueError, match=r"does not fit this model .*missing keys \['encoder.stem"):
        check_compatible(resnet, convnext, "other.pt")
    wider = build_spark("resnet18", "torch", decoder_width=64).state_dict()
    expected = r"shape mismatches \['decoder.blocks.0.up.weight: checkpoint \(32, 32, 4, 4\) vs model \(64, 64, 4, 4\)"
    with pytest.raises(ValueError, match=expected):
        check_compatible(resnet, wider, "wider.pt")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = save_atomic({"model": {"w": torch.ones(1000)}}, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.pt").write_text("hello")
    for name in ("truncated.pt", "text.pt"):
        with pytest.raises(ValueError, match="is not a loadable sparkme checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# torch warns that the hand-made pickle uses protocol 4; refusing that pickle is the point of the test.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as file:
        pickle.dump({"model": _Exploit()}, file)
    with pytest.raises(ValueError, match="weights_only=True refuses"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_unwritable_output_gives_a_clear_error_and_no_partial_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create folder .*sub"):
        save_atomic({"model": {}}, blocker / "sub" / "latest.pt")
    result = subprocess.run(_cli(blocker / "run"), cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "is not writable" in result.stderr


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = save_atomic({"model": {"w": torch.zeros(3)}}, tmp_path / "latest.pt")

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write .*latest.pt.*No space left on device"):
        save_atomic({"model": {"w": torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_kill_9_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = f"""
import os, signal, torch
from sparkme.engine.checkpoint import save_atomic
save_atomic({{"model": {{"w": torch.zeros(3)}}}}, {str(tmp_path / 'latest.pt')!r})
real_save = torch.save
def dying_save(obj, file, *a, **k):
    file.write(b"half a checkpoint")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
save_atomic({{"model": {{"w": torch.ones(3)}}}}, {str(tmp_path / 'latest.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert result.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(tmp_path / "latest.pt")["model"]["w"], torch.zeros(3))


# --- faults during training ----------------------------------------------------------------------------------------
def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_sigterm_checkpoints_and_exits_cleanly_with_resume_hint(tmp_path):
    process = subprocess.Popen(_cli(tmp_path, "trainer.max_steps=500", "trainer.ckpt_every=0"), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "metrics.jsonl", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    console = stdout + stderr  # hydra's job logging writes to stdout
    assert "received SIGTERM" in console and "resume=auto" in console
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert 1 <= state["step"] < 500


def test_kill_9_between_checkpoints_then_resume_auto_gives_the_uninterrupted_log_weights_and_pictures(tmp_path):
    # ConvNeXt with DropPath: resuming must also restore the RNG that drops the paths.
    common = ["model=convnext_atto", "model.drop_path_rate=0.1", "trainer.max_steps=9", "trainer.deterministic=true",
              "trainer.ckpt_every=4", "trainer.log_every=1", "trainer.vis_every=3"]
    straight = subprocess.Popen(_cli(tmp_path / "straight", *common), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    victim_dir = tmp_path / "killed"
    victim = subprocess.Popen(_cli(victim_dir, *common), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    kill_after = random.choice([5, 6])  # between the checkpoints of steps 4 and 8
    wait_for_step(victim_dir, kill_after, victim)
    assert victim.poll() is None, "the victim finished before it could be killed"
    victim.kill()
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    checkpoint_step = load_checkpoint(victim_dir / "checkpoints" / "latest.pt")["step"]
    killed_steps = [r["step"] for r in _records(victim_dir) if "loss" in r]
    assert killed_steps[-1] < 9 and not (victim_dir / "export").exists(), "killed after the end of training"
    # the log holds lines after the checkpoint: the resume has something to remove (a step takes far longer than
    # the 20 ms poll, so the kill lands a step after the chosen one at most)
    assert checkpoint_step == 4 < kill_after <= killed_steps[-1], (kill_after, checkpoint_step, killed_steps)

    resumed = subprocess.run(_cli(victim_dir, *common, "resume=auto"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=600) == 0, straight.communicate()[1][-3000:]
    assert _records(victim_dir) == _records(tmp_path / "straight"), f"killed after step {kill_after}"
    assert [r["step"] for r in _records(victim_dir)] == [0, *range(1, 10), 9]  # held-out loss first and last
    final = {name: load_checkpoint(d / "checkpoints" / "latest.pt") for name, d in
             (("straight", tmp_path / "straight"), ("resumed", victim_dir))}
    assert final["resumed"]["step"] == final["straight"]["step"] == 9
    assert all(torch.equal(final["straight"]["model"][k], final["resumed"]["model"][k])
               for k in final["straight"]["model"])
    pictures = {d.name: {p.name: p.read_bytes() for p in (d / "reconstructions").glob("*.png")}
                for d in (tmp_path / "straight", victim_dir)}
    assert sorted(pictures["killed"]) == [f"step_{s:07d}.png" for s in (3, 6, 9)]
    assert pictures["killed"] == pictures["straight"]


def test_two_jobs_on_one_run_dir_one_runs_the_other_exits_2_and_a_killed_holder_does_not_block_resume(tmp_path):
    command = _cli(tmp_path, "trainer.max_steps=100000", "trainer.ckpt_every=1")
    jobs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    deadline = time.time() + 600
    while all(job.poll() is None for job in jobs):
        assert time.time() < deadline, "neither job was refused"
        time.sleep(0.1)
    loser = next(job for job in jobs if job.poll() is not None)
    winner = next(job for job in jobs if job is not loser)
    _, stderr = loser.communicate()
    assert loser.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"sparkme-pretrain: error: run directory {str(tmp_path)!r} is in use by another job: "
                                f"pid {winner.pid} on host ")
    assert " since 20" in errors[0] and "run_dir=..." in errors[0]

    _wait_for(tmp_path / "checkpoints" / "latest.pt", winner)
    assert winner.poll() is None, "the running job stopped"
    winner.kill()
    winner.communicate()
    step = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"]
    resumed = subprocess.run(_cli(tmp_path, f"trainer.max_steps={step + 1}", "resume=auto"), cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["start_step"] == step
    assert f"taking over the lock of pid {winner.pid}" in resumed.stdout + resumed.stderr


def test_a_restart_keeps_the_log_up_to_its_step_and_drops_the_rest_and_half_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n" for step in range(6))
    path.write_text(whole + '{"step": 6, "lo')  # the victim died while writing step 6
    assert truncate_metrics(path, 3) == 3
    assert path.read_text() == "".join(whole.splitlines(keepends=True)[:4])
    assert truncate_metrics(path, 3) == 0
    assert truncate_metrics(path, 0) == 4 and path.read_text() == ""  # a fresh start writes step 0 again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_a_resumed_wandb_run_is_rewound_to_the_checkpoint_step(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: opened.append(kwargs) or SimpleNamespace(id="abc123"))
    MetricsLogger(tmp_path, "offline", start_step=0)
    MetricsLogger(tmp_path, "offline", resume_id="abc123", start_step=6)
    assert [kwargs["resume_from"] for kwargs in opened] == [None, "abc123?_step=6"]


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    result = subprocess.run(_cli(tmp_path, "optim.base_lr=1e12", "optim=adamw", "trainer.max_steps=30",
                                 "trainer.ckpt_every=1", "trainer.clip_grad=null"),
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr and "at step" in result.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] >= 1


def _compose(overrides: list[str], run_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["debug=fast", "backend=torch", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def test_a_skipped_non_finite_step_leaves_weights_and_optimizer_untouched(tmp_path):
    run = engine._build(_compose(["trainer.skip_nonfinite=true"], tmp_path), DistInfo())
    images = next(engine._next_batches(run, 0))
    before = {k: v.clone() for k, v in run.spark.state_dict().items()}
    assert engine._train_step(run, 0, [torch.full_like(images, float("nan"))]) is None
    assert all(torch.equal(before[k], v) for k, v in run.spark.state_dict().items())
    assert run.trainer.optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in run.spark.parameters())
    metrics = engine._train_step(run, 1, [images])
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in run.spark.state_dict().items())


def test_skip_nonfinite_skips_the_bad_step_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real_batches = engine._next_batches

    def poisoned(run, step):  # the images of step index 1 (the second step) are NaN
        for images in real_batches(run, step):
            yield images.fill_(float("nan")) if step == 1 else images

    monkeypatch.setattr(engine, "_next_batches", poisoned)
    cfg = _compose(["trainer.skip_nonfinite=true", "trainer.max_steps=5", "trainer.vis_every=0"], tmp_path)
    summary = engine.pretrain(cfg)
    assert "non-finite loss nan at step 1: step skipped" in caplog.text
    assert summary["step"] == 5 and len(summary["first_losses"]) == 4
    assert all(math.isfinite(loss) for loss in summary["first_losses"])
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 3, 4, 5]
    final = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert final["step"] == 5 and all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


def test_a_failing_torchrun_rank_stops_the_others_without_hanging(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "-m", "sparkme.cli", "debug=fast", "backend=torch", f"run_dir={tmp_path}", "trainer.max_steps=5000",
               "trainer.device=cpu"]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    _wait_for(tmp_path / "metrics.jsonl", launcher)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies abruptly
    _, stderr = launcher.communicate(timeout=180)  # no hang: torchrun tears the other rank down
    assert launcher.returncode != 0
    assert "ChildFailedError" in stderr or "exitcode  : -9" in stderr, stderr[-3000:]
    assert all(subprocess.run(["kill", "-0", w], capture_output=True).returncode != 0 for w in workers)
