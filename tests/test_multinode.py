"""Across nodes: two torchrun launchers with ``--nnodes=2`` on 127.0.0.1 (c10d rendezvous, gloo), started as
docs/multinode.md says. A worker killed with -9 between checkpoints is restarted by torchrun and resumes from the
last checkpoint; a node then lost for good ends with one line naming the checkpoint that survives; the run continued
from it ends bit-identical to an uninterrupted one (final weights, ``metrics.jsonl`` line for line). The same on
WebDataset shards (``data=shards``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shard_fixtures import uneven_shard_urls
from torch import nn

from sparkme.engine.checkpoint import load_checkpoint
from sparkme.engine.config_checks import check_trainer
from sparkme.engine.core import Trainer
from sparkme.engine.distributed import DistInfo
from sparkme.engine.lost_rank import RankLostError, describe_loss, is_rank_lost, raise_if_rank_lost
from sparkme.errors import UsageError
from sparkme.files import save_atomic

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "docs" / "multinode.md"
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # the recipe's environment (docs/multinode.md says why)
# tiny and deterministic: a step takes far longer than the 20 ms poll, so a kill lands between two checkpoints
TRAIN = ["debug=fast", "trainer.device=cpu", "optim=adamw", "trainer.deterministic=true", "trainer.max_steps=8",
         "trainer.ckpt_every=2", "trainer.log_every=1", "trainer.vis_every=0", "export_formats=[]", "resume=auto",
         "trainer.dist_timeout_s=60"]
JOIN_TIMEOUT_S = 20  # both launchers of a pair must meet within it; a survivor with restarts left waits this long


def torchrun_flags(port: int, run_id: str, join_timeout: int = JOIN_TIMEOUT_S) -> list[str]:
    """The recipe's torchrun flags, with this test's values."""
    return ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}", "--max-restarts=1", f"--rdzv-conf=join_timeout={join_timeout}"]


def _names(words: list[str]) -> set[str]:
    return {word.split("=", 1)[0] for word in words if word.startswith("--")}


def test_the_documented_recipe_is_what_the_test_runs():
    block = re.search(r"<!-- recipe -->\s*(?:<!--.*?-->\s*)?```bash\n(.*?)```", RECIPE.read_text(), re.S)
    assert block, f"{RECIPE} has no ```bash block after <!-- recipe -->"
    words = shlex.split(block.group(1).replace("\\\n", " "), comments=True)
    assert _names(words[words.index("torchrun") + 1:words.index("-m")]) == _names(torchrun_flags(1, "x"))
    assert {w.split("=", 1)[0] for w in words if w.startswith("TORCH_")} == set(ENV)
    assert "resume=auto" in words and any(w.startswith("trainer.dist_timeout_s=") for w in words)


def test_dist_timeout_is_checked_at_start_up():
    from omegaconf import OmegaConf

    for bad in (0, "10", 1.5, True):
        cfg = OmegaConf.create({"trainer": {"batch_size": 1, "accum_steps": 1, "max_steps": 1, "epochs": 1,
                                            "amp": None, "device": "cpu", "dist_timeout_s": bad}})
        with pytest.raises(UsageError, match=f"trainer.dist_timeout_s must be an integer .* got {bad!r}"):
            check_trainer(cfg)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    """One torchrun launcher (one "node" of one worker) and its output files."""

    launcher: subprocess.Popen
    out: Path

    def workers(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.launcher.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def kill_worker(self) -> None:
        workers = self.workers()
        assert workers, f"no worker to kill: {self.stderr()[-3000:]}"
        os.kill(workers[0], signal.SIGKILL)

    def lose(self) -> None:
        """The node dies: its launcher and workers at once (torchrun starts workers in sessions of their own)."""
        workers = self.workers()
        self.launcher.kill()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        self.launcher.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.lose()
            raise AssertionError(f"launcher still running after {timeout} s: {self.stderr()[-3000:]}") from None

    def stderr(self) -> str:
        return self.out.with_suffix(".err").read_text(errors="replace")


def _start_pair(tmp_path: Path, name: str, run_dir: Path, backend: str,
                data: tuple[str, ...] = ()) -> tuple[Node, Node]:
    """Two launchers of one rendezvous; the first hosts the rendezvous store, so the second can be lost. ``data``:
    overrides of the data group (none: the bundled photos' folder)."""
    port = _free_port()
    nodes = []
    for index in range(2):
        out = tmp_path / f"{name}_{index}.out"
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(port, f"{name}{port}"), "-m",
                   "sparkme.cli", f"backend={backend}", f"run_dir={run_dir}", *TRAIN, *data]
        launcher = subprocess.Popen(command, cwd=REPO, stdout=out.open("w"), stderr=out.with_suffix(".err").open("w"),
                                    env=dict(os.environ, OMP_NUM_THREADS="1", **ENV))
        nodes.append(Node(launcher, out))
        deadline = time.time() + 120
        while index == 0 and not _listening(port):
            assert launcher.poll() is None and time.time() < deadline, nodes[0].stderr()[-3000:]
            time.sleep(0.1)
    return nodes[0], nodes[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one wall-clock field (and without a line being written)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines if line.endswith("}")]


def _wait_for_step(run_dir: Path, step: int, nodes: tuple[Node, ...], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(r.get("step") == step and "loss" in r for r in _records(run_dir)):
        for node in nodes:
            assert node.launcher.poll() is None, f"ended before step {step}: {node.stderr()[-3000:]}"
        assert time.time() < deadline, f"step {step} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, ...]:
    """``data=shards`` on 16 generated images in 4 shards (5, 5, 5, 1): uneven across the two nodes,
    read by two loader workers on each."""
    return "data=shards", uneven_shard_urls(tmp_path_factory), "data.shuffle_buffer=3", "data.num_workers=2"


@pytest.mark.slow
@pytest.mark.parametrize("backend,source", [("torch", "folder"), ("minkowski", "folder"), ("torch", "shards")])
def test_a_killed_worker_restarts_a_lost_node_says_what_survives_and_the_run_ends_as_if_uninterrupted(
        tmp_path, request, backend, source):
    data = request.getfixturevalue("shards") if source == "shards" else ()
    straight = _start_pair(tmp_path, "straight", tmp_path / "straight", backend, data)
    run_dir = tmp_path / "faulty"
    first, second = _start_pair(tmp_path, "faulty", run_dir, backend, data)

    _wait_for_step(run_dir, 3, (first, second))  # between the checkpoints of steps 2 and 4
    second.kill_worker()  # torchrun restarts both nodes' workers; they resume from step 2
    _wait_for_step(run_dir, 5, (first, second))  # again between two checkpoints (4 and 6)
    second.lose()  # for good: the survivor ends with one line and a non-zero status
    assert first.wait(timeout=JOIN_TIMEOUT_S + 120) != 0
    # one line per failure that the survivor saw (the killed worker's too, when the survivor noticed it first)
    errors = [line for line in first.stderr().splitlines() if line.startswith("sparkme-pretrain: error:")]
    assert 1 <= len(errors) <= 2 and all("lost contact with the rank at 127.0.0.1" in e for e in errors), errors
    latest = run_dir / "checkpoints" / "latest.pt"
    assert f"the last checkpoint is {latest} at step 4; continue with the same command plus resume=auto" in errors[-1]
    assert "Error executing job" not in first.stderr()  # not inside hydra's traceback
    assert "connectFullMesh" not in first.stderr()  # the restart took one attempt (TORCH_DISABLE_SHARE_RDZV_...)
    assert load_checkpoint(latest)["step"] == 4

    again = _start_pair(tmp_path, "again", run_dir, backend, data)  # the node is back: resume=auto continues
    for node in (*again, *straight):
        assert node.wait(timeout=300) == 0, node.stderr()[-3000:]
    assert _records(run_dir) == _records(tmp_path / "straight")
    assert [r["step"] for r in _records(run_dir)] == [0, *range(1, 9), 8]  # held-out loss first and last
    final = {name: load_checkpoint(d / "checkpoints" / "latest.pt") for name, d in
             (("straight", tmp_path / "straight"), ("faulty", run_dir))}
    assert final["faulty"]["step"] == final["straight"]["step"] == 8
    weights = final["straight"]["model"]
    assert all(torch.equal(weights[k], final["faulty"]["model"][k]) for k in weights)


def test_a_lost_peer_is_told_apart_and_described_in_one_line(tmp_path):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.7]:3473: "
                        "Connection reset by peer")
    wrapped = ValueError("during backward")
    wrapped.__cause__ = gloo
    assert is_rank_lost(gloo) and is_rank_lost(wrapped)
    assert not is_rank_lost(RuntimeError("CUDA out of memory")) and not is_rank_lost(ValueError("bad config"))
    latest = tmp_path / "checkpoints" / "latest.pt"
    none_yet = describe_loss(gloo, latest, 600)
    assert none_yet.startswith("lost contact with the rank at 10.0.0.7 (Connection reset by peer)")
    assert f"no checkpoint was written yet ({latest} does not exist)" in none_yet
    save_atomic({"model": {}, "step": 40}, latest)
    line = describe_loss(gloo, latest, 600)
    assert "\n" not in line and "trainer.dist_timeout_s=600 s" in line
    assert f"the last checkpoint is {latest} at step 40; continue with the same command plus resume=auto" in line
    with pytest.raises(RankLostError, match="at step 40"):
        raise_if_rank_lost(gloo, DistInfo(world_size=2), latest, 600)
    raise_if_rank_lost(gloo, DistInfo(), latest, 600)  # one process: not a lost peer, the error stays as it is
    # a loader worker's SIGTERM (torchrun stopping the node) raised while gloo's error is being handled: the line
    # still names the peer and the cause, read from the chain
    loader = RuntimeError("DataLoader worker (pid 1012) is killed by signal: Terminated.")
    loader.__context__ = gloo
    assert describe_loss(loader, latest, 600).startswith(
        "lost contact with the rank at 10.0.0.7 (Connection reset by peer)")


def _convs() -> nn.Module:
    """A 1x1 and a depthwise conv: on channels-last inputs their weight gradients come back channels-last."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 7, padding=3, groups=16))


def _step_with_and_without_alignment(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        images = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(rank))
        images = images.contiguous(memory_format=torch.channels_last)
        loss_of = lambda ddp_model, micro, x: ddp_model(x).square().mean()  # noqa: E731
        for aligned in (True, False):  # aligned first: DDP warns only once per process
            model = _convs()
            trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DistInfo(rank, 2, rank))
            if aligned:
                trainer.wrap_ddp()
            else:  # DDP as it was built before
                trainer.ddp_model = nn.parallel.DistributedDataParallel(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.step(0, [images], loss_of)
            results[(rank, aligned)] = {"warned": any("Grad strides" in str(w.message) for w in caught),
                                        "weights": [p.detach().clone() for p in model.parameters()]}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gets_gradients_in_the_parameters_layout_and_the_same_weights(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_step_with_and_without_alignment, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[(rank, False)]["warned"], "the unaligned case no longer warns: the test proves nothing"
        assert not results[(rank, True)]["warned"]
        aligned, plain = results[(rank, True)]["weights"], results[(rank, False)]["weights"]
        assert all(torch.equal(a, b) for a, b in zip(aligned, plain, strict=True))
