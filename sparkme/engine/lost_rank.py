"""A rank lost mid-run (its process or node died, or it hung past ``trainer.dist_timeout_s``) said in one line.

Without this, the ranks that survive end with the communication library's error ("Connection reset by peer")
inside hydra's traceback, and nothing says what was saved. ``raise_if_rank_lost`` turns such an error into
``RankLostError``, whose message names the peer that stopped answering, the checkpoint that survives with its step
(read from disk: what ``resume=auto`` will find) and how to continue; ``exit_with_rank_lost`` prints that line
(once per node) and exits with status 1.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from sparkme.engine.distributed import DistInfo

EXIT_STATUS = 1
# What gloo's TCP transport and the c10d stores say when the other end is gone or silent (a dead process's
# sockets are reset at once; a powered-off node is only noticed at the timeout).
LOSS_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                "NCCL communicator was aborted")
CAUSES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out",
          "NCCL communicator was aborted")
_PEER = re.compile(r"\[([0-9A-Za-z.:_-]+)\]:\d+")


class RankLostError(RuntimeError):
    """Another rank stopped answering; the message is one line ending with how to continue."""


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and every error it was raised from or during: a loader or a wrapper may re-raise gloo's error under
    its own message, so the peer's address and the cause may sit in any of them."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def is_rank_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a collective that lost its peers."""
    return any(isinstance(link, dist.DistError) or any(marker in str(link) for marker in LOSS_MARKERS)
               for link in _chain(error))


def checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path``, or None when there is none readable (memory-mapped: no copy)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError):
        return None


def describe_loss(error: BaseException, latest: Path, timeout_s: int) -> str:
    """``lost contact with the rank at 10.0.0.7 (Connection reset by peer) ...; the last checkpoint is ... at step
    N; continue with the same command plus resume=auto``."""
    text = "\n".join(str(link) for link in _chain(error))
    peer = _PEER.search(text)
    who = f"the rank at {peer.group(1)}" if peer else "another rank"
    cause = next((c for c in CAUSES if c in text), type(error).__name__)
    step = checkpoint_step(latest)
    saved = (f"the last checkpoint is {latest} at step {step}" if step is not None
             else f"no checkpoint was written yet ({latest} does not exist)")
    return (f"lost contact with {who} ({cause}): its process or node died, or it hung for more than "
            f"trainer.dist_timeout_s={timeout_s} s; {saved}; continue with the same command plus resume=auto "
            "(torchrun --max-restarts does so once every node is back)")


def raise_if_rank_lost(error: BaseException, dist_info: DistInfo, latest: Path, timeout_s: int) -> None:
    """Raise ``RankLostError`` (from ``error``) when several ranks run and ``error`` is a lost peer; else return."""
    if dist_info.world_size > 1 and is_rank_lost(error):
        raise RankLostError(describe_loss(error, latest, timeout_s)) from error


def exit_with_rank_lost(command: str, error: RankLostError) -> NoReturn:
    """Print ``<command>: error: <the line>`` (from the first rank of each node only) and exit with status 1."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"{command}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_STATUS)
