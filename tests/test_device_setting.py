"""One statement of the device settings: the start-up checks, the process set-up and the benchmark accept the same
names and refuse them with the same one-line message."""

import pytest
import torch
from omegaconf import OmegaConf

from sparkme.bench import BenchSettings
from sparkme.cli import CONFIG_DIR
from sparkme.engine.config_checks import check_trainer
from sparkme.engine.distributed import resolve_device, setup_distributed
from sparkme.errors import UsageError

NO_GPU = not torch.cuda.is_available()


def _check_trainer(device: str) -> None:
    trainer = OmegaConf.load(f"{CONFIG_DIR}/trainer/default.yaml")
    trainer.device = device
    check_trainer(OmegaConf.create({"trainer": trainer}))


@pytest.mark.parametrize("device, message", [
    ("tpu", "trainer.device must be auto, cpu or cuda, got 'tpu'"),
    ("cuda:1", "trainer.device must be auto, cpu or cuda, got 'cuda:1'"),  # the GPU is the local rank's
    pytest.param("cuda", "trainer.device=cuda but torch sees no GPU", marks=pytest.mark.skipif(not NO_GPU,
                                                                                               reason="has a GPU")),
])
def test_start_up_check_and_process_set_up_refuse_alike(device, message):
    for refuse in (_check_trainer, setup_distributed):
        with pytest.raises(UsageError, match=message):
            refuse(device)


def test_auto_and_cpu_resolve_and_the_bench_also_takes_an_index():
    assert resolve_device("auto") == torch.device("cuda" if not NO_GPU else "cpu")
    assert setup_distributed("cpu").device == torch.device("cpu")
    _check_trainer("auto")
    with pytest.raises(UsageError, match="--device must be auto, cpu, cuda or cuda:N, got 'cuda:-1'"):
        BenchSettings(["resnet18"], ["masked"], device="cuda:-1")
    assert BenchSettings(["resnet18"], ["masked"], device="cpu").device == torch.device("cpu")
