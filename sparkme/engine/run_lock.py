"""One job per run directory: a lock that a second job is refused by, and that a killed job does not leave behind.

Two files in the run directory:

- ``.sparkme-lock``: never deleted; its holder keeps an exclusive ``flock`` on it. The kernel drops that lock when
  the holding process dies, however it dies (``kill -9`` included), so on one host a dead holder never blocks.
- ``.sparkme-lock.json``: who holds the lock (host, pid, since when) for the refusal message, plus a heartbeat
  counter that a background thread advances every ``heartbeat_s`` seconds.

A holder on *another host* is judged by its heartbeat, not by ``flock`` (on some shared file systems, e.g. Lustre
with ``localflock``, a ``flock`` is only seen by its own node): a contender watches the counter for
``STALE_BEATS`` heartbeat periods; a counter that moves means the holder lives (refused), one that stands still
means its job is gone (taken over). Watching a counter instead of comparing time stamps keeps the decision free of
clock skew between hosts.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sparkme.errors import UsageError
from sparkme.files import write_atomic

log = logging.getLogger(__name__)

LOCK_NAME = ".sparkme-lock"
HOLDER_NAME = ".sparkme-lock.json"
HEARTBEAT_S = 10.0
STALE_BEATS = 3  # a foreign holder whose heartbeat stands still this many periods is gone
ORPHAN_WAIT_S = 10.0  # how long a locked flock without a live recorded holder is waited for


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_holder(path: Path) -> dict | None:
    """The holder record, or None when there is none (or it cannot be parsed)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_atomic(path: Path, record: dict) -> None:
    write_atomic(path, lambda file: json.dump(record, file), binary=False)


def describe(holder: dict | None) -> str:
    """``pid 123 on host node7 since 2026-11-29T09:00:00Z`` (or what is known of an unreadable record)."""
    if holder is None:
        return "another process (holder record not readable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


class RunLock:
    """Exclusive hold of a run directory for one job (under torchrun: rank 0 only).

    Args:
        run_dir: the run directory (created if missing).
        heartbeat_s: seconds between heartbeats; a foreign-host contender waits up to ``STALE_BEATS`` of them.
        host: this machine's name (tests pass another one to play a second host).

    Use ``acquire()`` once, ``release()`` at the end (or as a context manager). ``check()`` raises when another job
    took the directory over (possible only after this job's heartbeat stopped, e.g. a frozen file system).
    """

    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, host: str | None = None):
        self.run_dir = Path(run_dir)
        self.lock_path = self.run_dir / LOCK_NAME
        self.holder_path = self.run_dir / HOLDER_NAME
        self.heartbeat_s = heartbeat_s
        self.host = host or socket.gethostname()
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # --- acquiring ------------------------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise ``UsageError`` (one line: the directory, the holder, what to do)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            kernel_lock = self._take_kernel_lock()
            previous = _read_holder(self.holder_path)
            if previous is not None:
                self._judge_previous(previous, kernel_lock)
            self._record = {"host": self.host, "pid": os.getpid(), "token": self.token, "beats": 0,
                            "heartbeat_s": self.heartbeat_s, "since": _utc_now()}
            _write_atomic(self.holder_path, self._record)
        except BaseException:
            self._close_fd()
            raise
        self._thread = threading.Thread(target=self._beat, name="sparkme-run-lock", daemon=True)
        self._thread.start()
        return self

    def _take_kernel_lock(self) -> bool | None:
        """Take the ``flock``: True when taken, None where the file system has none; refuse when a live process
        holds it.

        While the record names a live process on this host the refusal is immediate. Otherwise wait a little: the
        new holder writes its record right after locking, and the forked data-loader workers of a killed job
        keep its lock until they notice their parent is gone (a second or two).
        """
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("flock is not supported on %s (%s): the run lock relies on pid checks and heartbeats",
                            self.run_dir, error.strerror)
                return None
            holder = _read_holder(self.holder_path)
            if holder is not None and holder.get("host") == self.host and _pid_alive(int(holder.get("pid", -1))):
                self._refuse(holder)
            if time.monotonic() > deadline:
                self._refuse(holder)
            time.sleep(0.1)

    def _judge_previous(self, previous: dict, kernel_lock: bool | None) -> None:
        """Decide whether the recorded holder still runs: refuse if so, log the take-over if not."""
        if previous.get("host") == self.host:
            # With the kernel lock in hand the recorded process cannot hold it: it is gone (or never unlocked).
            if kernel_lock is None and _pid_alive(int(previous.get("pid", -1))):
                self._refuse(previous)
            log.warning("run directory %s: taking over the lock of %s (that process is gone)", self.run_dir,
                        describe(previous))
            return
        period = float(previous.get("heartbeat_s", self.heartbeat_s))
        log.info("run directory %s was held by %s: watching its heartbeat for up to %.0f s", self.run_dir,
                 describe(previous), STALE_BEATS * period)
        if self._heartbeat_moves(previous, period):
            self._refuse(_read_holder(self.holder_path) or previous)
        log.warning("run directory %s: taking over the lock of %s (its heartbeat stood still for %.0f s)",
                    self.run_dir, describe(previous), STALE_BEATS * period)

    def _heartbeat_moves(self, previous: dict, period: float) -> bool:
        """Watch the record for ``STALE_BEATS`` periods: True as soon as it changes (its holder is alive)."""
        deadline = time.monotonic() + STALE_BEATS * period
        while time.monotonic() < deadline:
            time.sleep(min(period / 4, max(deadline - time.monotonic(), 0.0)))
            current = _read_holder(self.holder_path)
            if current is not None and (current.get("token"), current.get("beats")) != (previous.get("token"),
                                                                                        previous.get("beats")):
                return True
        return False

    def _refuse(self, holder: dict | None) -> None:
        raise UsageError(
            f"run directory {str(self.run_dir)!r} is in use by another job: {describe(holder)}; wait for it to end "
            f"or stop it, choose another run_dir=..., or, if no such job runs, delete {str(self.holder_path)!r}")

    # --- holding --------------------------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read_holder(self.holder_path)
            if current is None or current.get("token") != self.token:
                self.lost = f"the run directory's lock was taken over by {describe(current)}"
                log.error("run directory %s: %s; this job stops writing checkpoints", self.run_dir, self.lost)
                return
            self._record["beats"] += 1
            try:
                _write_atomic(self.holder_path, self._record)
            except OSError as error:  # a file system hiccup: the next beat tries again
                log.warning("run lock heartbeat failed: %s", error)

    def check(self) -> None:
        """Raise ``RuntimeError`` when another job took the directory over (this one must not overwrite its files)."""
        if self.lost is not None:
            raise RuntimeError(f"run directory {str(self.run_dir)!r}: {self.lost}")

    def release(self) -> None:
        """Stop the heartbeat, remove the holder record (if still ours) and drop the kernel lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = _read_holder(self.holder_path)
        if current is not None and current.get("token") == self.token:
            self.holder_path.unlink(missing_ok=True)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
