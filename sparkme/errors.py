"""User errors: bad input that a command reports in one line, as opposed to bugs, which keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UsageError(ValueError):
    """Bad input from the user (a config value, a path, a file): the message says what was wrong, the value, and
    what is accepted. The command-line tools print it as ``sparkme-<cmd>: error: <message>`` and exit with status 2;
    Python callers get an ordinary ``ValueError``."""


def exit_with_usage_error(command: str, error: BaseException) -> NoReturn:
    """Print ``<command>: error: <first line of the message>`` to stderr and exit with status 2."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_reporting_usage_errors(command: str, main: Callable[[], object]) -> None:
    """Run ``main()``; a ``UsageError`` (also when chained as the cause of another exception, as hydra does) becomes
    one line and exit status 2, everything else propagates with its traceback."""
    try:
        main()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is (caused by) a UsageError
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UsageError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        exit_with_usage_error(command, cause)
