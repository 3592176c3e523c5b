"""What every command-line entry point shares: exit codes, one-line error reports, quiet library warnings.

A user error (bad config value, missing file, damaged checkpoint, full disk, diverged training) is reported as one
line ``prog: error: <what is wrong, where, what to do>`` on stderr, with no traceback, and only once per job:
errors that every rank detects identically (:class:`UserError`, config errors) are printed by rank 0 alone.
``ONEREASON_TRACEBACK=1`` prints the traceback as well.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from typing import Callable, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
# sysexits.h EX_TEMPFAIL: "temporary failure, try again". The trainer stopped early (SIGTERM, train.exit_at_iteration,
# train.exit_after_minutes) after saving a checkpoint: requeue the job (SLURM: scontrol requeue) to continue.
EXIT_REQUEUE = 75
EXIT_TERMINATED = 128 + 15  # what a shell reports for a process killed by SIGTERM

# Errors a user can fix from the message; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError, AssertionError, OSError)


class UserError(ValueError):
    """A user-facing error that every rank raises identically (so rank 0 alone reports it)."""


def report_error(prog: str, exc: BaseException) -> None:
    """Print ``exc`` as one line: on rank 0 for errors every rank shares, on the raising rank otherwise."""
    from megatron_onereason.config import ConfigError
    from megatron_onereason.platform.distributed import detect_launch_env

    rank = detect_launch_env().rank
    shared = isinstance(exc, (UserError, ConfigError))
    if rank != 0 and shared:
        return
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    bare = message.startswith("[Errno")  # OSError's own wording: say the file first, like every other message
    if isinstance(exc, OSError) and exc.filename and (bare or str(exc.filename) not in message):
        message = f"{exc.filename}: {exc.strerror or message}"
    where = "" if rank == 0 or shared else f"[rank {rank}] "
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    print(f"{prog}: {kind}: {where}{message or type(exc).__name__}", file=sys.stderr, flush=True)
    if os.environ.get("ONEREASON_TRACEBACK"):
        traceback.print_exception(exc)


# How gloo / NCCL / TCPStore report that another process of the job went away: a consequence, never the cause.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "recvValue failed", "Socket Timeout", "failed to recv, got 0 bytes")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` only says that another rank of the job ended (whose own error is the one to report)."""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)


def run_cli(prog: str, action: Callable[[], Optional[int]]) -> int:
    """Run ``action()``; user errors become one line and exit code 1 (2 for config errors).

    On any error, SIGTERM gets its default action back (the trainer turns it into an early-stop request), so a
    launcher stopping the job after the first failure is obeyed at once; a rank that failed only because another
    one ended first says so in a short line without ``error:``, leaving the first rank's error the one line."""
    from megatron_onereason.config import ConfigError

    try:
        code = action()
    except Terminated as e:
        print(f"{prog}: {e}; partial output removed", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except ConfigError as e:
        _default_sigterm()
        report_error(prog, e)
        return EXIT_CONFIG
    except USER_ERRORS as e:
        _default_sigterm()
        report_error(prog, e)
        return EXIT_ERROR
    except BaseException as e:
        _default_sigterm()
        if not peer_lost(e):
            raise
        from megatron_onereason.platform.distributed import detect_launch_env

        print(f"{prog}: [rank {detect_launch_env().rank}] stopped: another process of the job ended first (its "
              "error is the one to read)", file=sys.stderr, flush=True)
        return EXIT_ERROR
    return EXIT_OK if code is None else code


def _default_sigterm() -> None:
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Terminated(BaseException):
    """SIGTERM turned into an exception, so ``finally`` blocks and temp-file clean-up run on the way out."""


def raise_on_sigterm() -> None:
    """For one-shot tools (converters, preprocessing): SIGTERM unwinds like Ctrl-C, removing partial output."""

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# Import-time notices of megatron-core / torch that say nothing actionable on CPU (8 per converter call).
_QUIET = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`load_state_dict` is deprecated",
    r"Please use DTensor instead",
)


def quiet_library_warnings() -> None:
    """Silence megatron-core's fallback notices (no TE/apex) and deprecations we cannot act on."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
