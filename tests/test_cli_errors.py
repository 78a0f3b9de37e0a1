"""Bad input to the real command-line tools ends in one line, ``sparkme-<cmd>: error: ...``, exit status 2, and no
traceback, found at start-up (every case below would otherwise run for a while or crash deep inside)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparkme.models import build_spark

BIN = Path(sys.executable).parent
FAST = ["debug=fast", "backend=torch", "data.num_workers=0"]


def _sparkme_checkpoint(path: Path, model_name: str) -> Path:
    model = build_spark(model_name, backend="masked", decoder_width=32)
    torch.save({"model": model.state_dict(), "config": {}, "model_name": model_name}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    made = {"dir": root}
    made["garbage"] = root / "garbage.pt"
    made["garbage"].write_bytes(os.urandom(4096))
    whole = _sparkme_checkpoint(root / "whole.pt", "resnet18")
    made["truncated"] = root / "truncated.pt"
    made["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    made["other_model"] = _sparkme_checkpoint(root / "resnet34.pt", "resnet34")
    made["pickled"] = root / "pickled.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, made["pickled"])
    made["not_sparkme"] = root / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, made["not_sparkme"])
    made["empty"] = root / "empty_folder"
    made["empty"].mkdir()
    made["unreadable"] = root / "unreadable_images"
    made["unreadable"].mkdir()
    for i in range(3):
        (made["unreadable"] / f"photo_{i}.jpg").write_bytes(b"not a jpeg" * 10)
    return made


# (command, arguments with {placeholders} for the files above, text the error line must contain)
CASES = {
    "image_size": ("sparkme-pretrain", ["image_size=100"], "image size 100x100 is not supported"),
    "mask_ratio": ("sparkme-pretrain", ["mask_ratio=1.5"], "mask ratio must be in [0, 1)"),
    "batch_size": ("sparkme-pretrain", ["trainer.batch_size=0"], "trainer.batch_size must be an integer >= 1, got 0"),
    "amp": ("sparkme-pretrain", ["trainer.amp=int8"], "trainer.amp must be null, bf16 or fp16, got 'int8'"),
    "lamb_compile": ("sparkme-pretrain", ["optim.optimizer.compile=maybe"],
                     "optim.optimizer.compile must be true or false, got 'maybe'"),
    "unknown_model": ("sparkme-pretrain", ["model=resnet5"], "unknown model 'resnet5'; choose one of"),
    "unknown_model_name": ("sparkme-pretrain", ["model.model_name=vgg16"], "'vgg16'"),
    "unknown_backend": ("sparkme-pretrain", ["backend=spconv"], "unknown backend 'spconv'; choose one of"),
    "sweep_typo": ("sparkme-pretrain", ["-m", "backend=torch,minkowsky"], "unknown backend 'minkowsky'"),
    "missing_root": ("sparkme-pretrain", ["data=imagefolder"], "data=imagefolder needs data.root="),
    "missing_folder": ("sparkme-pretrain", ["data=imagefolder", "data.root={dir}/nowhere"],
                       "nowhere' does not exist"),
    "empty_folder": ("sparkme-pretrain", ["data=imagefolder", "data.root={empty}"], "has no image files"),
    "unreadable_images": ("sparkme-pretrain", ["data=imagefolder", "data.root={unreadable}"],
                          "photo_0.jpg' cannot be read"),
    "corrupt_resume": ("sparkme-pretrain", ["resume={garbage}"], "garbage.pt' is not a loadable sparkme checkpoint"),
    "truncated_resume": ("sparkme-pretrain", ["resume={truncated}"], "truncated.pt' is not a loadable sparkme"),
    "pickled_resume": ("sparkme-pretrain", ["resume={pickled}"], "argparse.Namespace"),
    "not_sparkme_resume": ("sparkme-pretrain", ["resume={not_sparkme}"], "is not a sparkme checkpoint"),
    "missing_resume": ("sparkme-pretrain", ["resume={dir}/missing.pt"], "missing.pt' is not a file"),
    "other_model_resume": ("sparkme-pretrain", ["resume={other_model}"],
                           "is a checkpoint of resnet34; this run builds resnet18"),
    "init_other_model": ("sparkme-pretrain", ["init={other_model}"], "do not fit this model"),
    "init_corrupt": ("sparkme-pretrain", ["init={garbage}"], "garbage.pt"),
    "export_corrupt": ("sparkme-export", ["ckpt={garbage}", "out={dir}/x.pt"], "is not a loadable sparkme"),
    "export_missing": ("sparkme-export", ["ckpt={dir}/missing.pt", "out={dir}/x.pt"], "missing.pt"),
    "bench_ratio": ("sparkme-bench", ["--models", "resnet18", "--ratios", "1.5"], "1.5"),
    "unknown_setting": ("sparkme-pretrain", ["eval.k=20"],
                        "unknown setting 'eval.k' in 'eval.k=20': eval has every, per_class, root"),
    "unknown_setting_after_flag": ("sparkme-pretrain", ["--cfg", "job", "trainer.epoch=3"],
                                   "unknown setting 'trainer.epoch'"),
    "finetune_unknown_setting": ("sparkme-finetune", ["recipe.epoch=3"],
                                 "unknown setting 'recipe.epoch' in 'recipe.epoch=3': recipe has base_lr"),
    "probe_unknown_setting": ("sparkme-probe", ["knn.kk=3"],
                              "unknown setting 'knn.kk' in 'knn.kk=3': knn has bank_dtype, chunk"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_with_exit_status_2(case, files, tmp_path):
    command, args, expected = CASES[case]
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    if command == "sparkme-pretrain":
        args = FAST + [f"run_dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"] + args
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")
    result = subprocess.run([str(BIN / command), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert "weights_only=False" not in output, output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith(f"{command}: error: ")]
    assert len(error_lines) == 1, output
    assert expected in error_lines[0], output
    assert not (tmp_path / "run" / "checkpoints").exists(), "the run started before the error was found"
    assert set(os.listdir(tmp_path)) <= {"run", "multirun"}, "written outside run_dir"
