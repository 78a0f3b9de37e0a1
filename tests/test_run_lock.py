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
