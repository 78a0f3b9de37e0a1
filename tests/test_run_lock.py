"""The run-directory lock: one job per directory; a dead holder (killed here, or silent on another host) does not
block the next job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sparkme.engine.run_lock import HOLDER_NAME, STALE_BEATS, RunLock
from sparkme.errors import UsageError


def test_a_second_holder_is_refused_in_one_line_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UsageError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"run directory {str(tmp_path)!r} is in use by another job: pid {os.getpid()} on host " in message
        assert " since 20" in message and "run_dir=..." in message
    with RunLock(tmp_path) as again:  # released: the next job gets it
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["token"] == again.token
    assert not (tmp_path / HOLDER_NAME).exists()


def test_the_lock_of_a_sigkilled_process_is_taken_over(tmp_path, caplog):
    script = f"from sparkme.engine.run_lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); print(1, flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", script + "; import time; time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    with pytest.raises(UsageError, match=f"pid {holder.pid} on host"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["token"] == lock.token
    assert f"taking over the lock of pid {holder.pid}" in caplog.text and "that process is gone" in caplog.text


def _foreign_record(tmp_path, beats: int = 0) -> dict:
    record = {"host": "other-node", "pid": 1, "token": "theirs", "beats": beats, "heartbeat_s": 0.05,
              "since": "2026-11-29T08:00:00Z"}
    (tmp_path / HOLDER_NAME).write_text(json.dumps(record))
    return record


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    # flock is not seen across nodes on some shared file systems: a foreign record is trusted only while it beats.
    record = _foreign_record(tmp_path)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.02):
            record["beats"] += 1
            (tmp_path / HOLDER_NAME).write_text(json.dumps(record))

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(UsageError, match="pid 1 on host other-node since 2026-11-29T08:00:00Z"):
            RunLock(tmp_path).acquire()
    finally:
        stop.set()
        beating.join()
    _foreign_record(tmp_path)  # the same holder, now silent
    started = time.monotonic()
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["token"] == lock.token
    assert time.monotonic() - started >= STALE_BEATS * 0.05


def test_a_holder_whose_lock_was_taken_over_stops_itself(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.02).acquire()
    try:
        lock.check()  # still ours
        _foreign_record(tmp_path)
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(RuntimeError, match="taken over by pid 1 on host other-node"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / HOLDER_NAME).read_text())["token"] == "theirs"  # not deleted: not ours


def _tree(folder) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run_dir", "hydra.run.dir"])
def test_a_refused_job_leaves_no_trace_and_the_holder_gets_hydras_records_in_run_dir(tmp_path, where):
    # hydra writes .hydra/ and opens its log before the task: a refused job used to overwrite the first job's records
    cli = [sys.executable, "-m", "sparkme.cli", "debug=fast", "backend=torch", "trainer.max_steps=1",
           "trainer.vis_every=0", "export_formats=[]"]
    run_dir, repo = tmp_path / "run", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- the first job's overrides\n")
    (run_dir / "cli.log").write_text("the first job's log\n")
    with RunLock(run_dir, heartbeat_s=3600):  # the holder's own record stays still while the other job runs
        before = _tree(run_dir)
        refused = subprocess.run([*cli, f"{where}={run_dir}", "seed=7"], cwd=tmp_path, capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONPATH=repo))
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "is in use by another job" in refused.stderr
        assert _tree(run_dir) == before
    # the job that holds the directory writes hydra's records and log there, whichever directory hydra had
    held = subprocess.run([*cli, f"run_dir={run_dir}", "seed=8"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert held.returncode == 0, held.stderr[-3000:]
    assert "seed=8" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "seed: 8" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert "output_subdir: null" in (run_dir / ".hydra" / "hydra.yaml").read_text()
    log = (run_dir / "cli.log").read_text().splitlines()
    assert log[0] == "the first job's log" and log[1].startswith("[20"), log  # appended there, not in hydra's dir
    assert not list((tmp_path / "runs").rglob("*.log")) and not list((tmp_path / "runs").rglob(".hydra"))
