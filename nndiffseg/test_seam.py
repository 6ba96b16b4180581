"""The package's one test seam: at a known point (checkpoint_written, case_exported; tests/site adds
pool_result_transfer) a process announces itself, so that a fault test can signal it exactly there instead of
sleeping for a guessed time. Inert unless nnDiffSeg_test_hook is set: one environment lookup per point."""
import os
import time

HOOK_ENV = "nnDiffSeg_test_hook"  # POINT or POINT:pause; several separated by commas
MARKER = "nnDiffSeg_test_hook reached"
PAUSE_S = 120  # long enough for any test to send its signal; the process carries on after it
# A signal the kernel hands to another thread (torch's, the export pool's) does not wake the main thread from
# a long sleep: Python runs its handler only when the main thread next runs bytecode. Short sleeps let it.
SLEEP_SLICE_S = 0.1


def reached(point: str) -> None:
    """At ``point``: print the marker line when the hook names it, and with ':pause' wait for the signal."""
    for entry in os.environ.get(HOOK_ENV, "").split(","):
        name, _, mode = entry.partition(":")
        if name == point:
            print(f"{MARKER}: {point}", flush=True)
            if mode == "pause":
                deadline = time.monotonic() + PAUSE_S
                while time.monotonic() < deadline:
                    time.sleep(SLEEP_SLICE_S)
            return
