"""Errors caused by what the user gave us, and how the command-line tools report them."""
import faulthandler
import json
import os
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn

# set (to anything but 0) to see the traceback behind an ERROR: line
DEBUG_ENV = "nnDiffSeg_debug"
# after Ctrl-C, the longest the interpreter's shutdown (worker processes, threads, atexit) may take
EXIT_DEADLINE_S = 5.0


class NnDiffSegError(Exception):
    """Bad input or a state the user must fix. The CLIs print the message (no traceback) and exit 1."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def describe_error(e: BaseException) -> str:
    """One line for a file, environment or nnU-Net fault: what went wrong and, where known, with which file."""
    if isinstance(e, OSError):
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        what = e.strerror or str(e) or type(e).__name__
        return f"{what}: {files}" if files else what
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"


def _exit_by_deadline(code: int) -> None:
    """One Ctrl-C must end the tool within seconds, even if a library's cleanup at exit hangs."""
    def force() -> None:
        sys.stderr.flush()
        os._exit(code)
    timer = threading.Timer(EXIT_DEADLINE_S, force)
    timer.daemon = True
    timer.start()


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI's main function: user errors, file and environment faults and nnU-Net's own assertions become
    one ERROR: line on stderr and exit status 1 (with nnDiffSeg_debug=1 after the traceback). SIGUSR1 prints
    every thread's stack to stderr (to see where a tool that seems stuck is waiting)."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), or no real stderr
        pass
    try:
        code = main()
    except NnDiffSegError as e:
        if debugging():
            traceback.print_exc()
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        _exit_by_deadline(130)
        sys.exit(130)
    except (OSError, json.JSONDecodeError, AssertionError, RuntimeError) as e:
        if debugging():
            traceback.print_exc()
        hint = "" if debugging() else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"ERROR: {describe_error(e)}{hint}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
