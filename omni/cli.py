"""The command-line frame every entry point shares: a UserError becomes one line on stderr and exit
status 2, never a traceback. No torch here, so light commands stay light."""
from __future__ import annotations

import sys

from omni.config import UserError


def one_line(error: Exception) -> str:
    """The user-facing line of an error; errors re-raised from DataLoader workers carry a
    traceback in their message, whose last line is the original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if len(lines) > 1 and ": " in last and last.split(": ", 1)[0].endswith("Error"):
        last = last.split(": ", 1)[1]
    return last


def run_cli(main) -> None:
    """Run `main()`, turning a UserError into one line on stderr and exit status 2, and a Ctrl-C that
    `main` leaves to Python (a KeyboardInterrupt) into one line and 130, the shell's status for it."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
