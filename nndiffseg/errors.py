"""Errors caused by what the user gave us, and how the command-line tools report them."""
import contextlib
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
# after Ctrl-C or SIGTERM, the longest a tool may take to stop, its cleanup (pools, temporary files) included
STOP_DEADLINE_S = 10.0


class NnDiffSegError(Exception):
    """Bad input or a state the user must fix. The CLIs print the message (no traceback) and exit 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a cluster's time limit): a tool stops as on Ctrl-C, the same cleanup included,
    with exit status 143."""


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


def _exit_by_deadline(code: int, seconds: float = EXIT_DEADLINE_S) -> None:
    """One Ctrl-C must end the tool within seconds, even if a library's cleanup at exit hangs."""
    def force() -> None:
        sys.stderr.flush()
        os._exit(code)
    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


# signal -> what it raises in the main thread, and the exit status
_STOP_SIGNALS = {signal.SIGINT: (KeyboardInterrupt, 130), signal.SIGTERM: (Terminated, 143)}
_replaced_handlers = {}  # signal -> the handler _stop replaced while run_cli runs


def _stop(signum: int, frame) -> NoReturn:
    exception, code = _STOP_SIGNALS[signum]
    _exit_by_deadline(code, STOP_DEADLINE_S)  # a cleanup that hangs (a pool's shutdown) cannot hold the tool
    raise exception()


@contextlib.contextmanager
def _stop_signals_handled():
    """Ctrl-C and SIGTERM raise KeyboardInterrupt / Terminated in the main thread. A signal the tool was started
    with ignored (nohup, a background job) stays ignored."""
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                _replaced_handlers[signum] = signal.signal(signum, _stop)
    try:
        yield
    finally:
        _restore_stop_handlers()


def _restore_stop_handlers() -> None:
    """Also in a forked worker (a fork pool's), which inherits the handlers: Pool.terminate's SIGTERM must end
    it silently, as before, not raise Terminated with a traceback."""
    while _replaced_handlers:
        signal.signal(*_replaced_handlers.popitem())


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_restore_stop_handlers)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI's main function: user errors, file and environment faults and nnU-Net's own assertions become
    one ERROR: line on stderr and exit status 1 (with nnDiffSeg_debug=1 after the traceback). Ctrl-C ends it
    with status 130, SIGTERM with 143, both within STOP_DEADLINE_S. SIGUSR1 prints every thread's stack to
    stderr (to see where a tool that seems stuck is waiting)."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), or no real stderr
        pass
    try:
        with _stop_signals_handled():
            code = main()
    except NnDiffSegError as e:
        if debugging():
            traceback.print_exc()
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
        print("Terminated." if code == 143 else "Interrupted.", file=sys.stderr)
        _exit_by_deadline(code)
        sys.exit(code)
    except (OSError, json.JSONDecodeError, AssertionError, RuntimeError) as e:
        if debugging():
            traceback.print_exc()
        hint = "" if debugging() else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"ERROR: {describe_error(e)}{hint}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
