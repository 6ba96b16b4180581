"""Errors caused by what the user gave us, and how the command-line tools report them."""
import sys
from typing import Callable, NoReturn


class NnDiffSegError(Exception):
    """Bad input or a state the user must fix. The CLIs print the message (no traceback) and exit 1."""


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI's main function: user errors become one clear line on stderr and exit status 1."""
    try:
        code = main()
    except NnDiffSegError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
