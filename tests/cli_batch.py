"""Run many command lines of the nnDiffSeg_ tools in one process (one import of torch and nnU-Net instead of
one per command), each as its console script would: ``sys.argv`` set, stdout and stderr captured, the exit
status taken from SystemExit, and an exception that escapes printed as the traceback a user would see.

    python tests/cli_batch.py CASES.json RESULTS.json

CASES.json: a list of {"tool": "nnDiffSeg_train", "args": [...], "env": {...}}; the nnU-Net folders come from
this process's environment (nnU-Net reads them once, at import), so every command of one batch uses the same
folders. A test of a tool's own process (its exit, signals, start-up) uses tests/cli.py run_tool."""
import contextlib
import importlib
import io
import json
import os
import signal
import sys
import time
import traceback

from nndiffseg.console import TOOLS as ENTRIES


class CaseTimeout(Exception):
    pass


def _timeout(signum, frame):
    raise CaseTimeout()


def run_case(tool: str, args: list, env: dict) -> dict:
    module, function = ENTRIES[tool].split(":")
    entry = getattr(importlib.import_module(module), function)
    saved_env = dict(os.environ)
    os.environ.update(env)
    sys.argv = [tool, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code, start = 0, time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            signal.alarm(int(os.environ.get("CLI_BATCH_CASE_TIMEOUT", "0")))  # 0: none
            entry()
        except CaseTimeout:  # a command that should have refused but started real work
            code = "timeout"
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            signal.alarm(0)
    os.environ.clear()
    os.environ.update(saved_env)
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    cases_file, results_file = sys.argv[1:3]  # run_case replaces sys.argv
    cases = json.loads(open(cases_file).read())
    signal.signal(signal.SIGALRM, _timeout)
    results = [run_case(c["tool"], c["args"], c.get("env", {})) for c in cases]
    with open(results_file, "w") as f:
        json.dump(results, f)
    failed = [f"{c['tool']} {' '.join(c['args'])}" for c, r in zip(cases, results) if r["returncode"] != 0]
    print(f"{len(cases)} command(s) in {sum(r['seconds'] for r in results):.0f} s; {len(failed)} exited non-zero")


if __name__ == "__main__":
    main()
