"""How the `fra` command line reports a failure: one line on stderr, exit code 2 for a usage
error (a flag that argparse or a config refuses) and 1 for anything that fails while running.
`fra --debug ...` or FRA_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(ValueError):
    """A flag or argument is wrong (exit code 2); the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `fra ingest: error: <what> (see fra ingest --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debug_wanted(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether --debug (anywhere on the line) or FRA_DEBUG=1 asks for tracebacks; argv without it."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("FRA_DEBUG", "") not in ("", "0"), rest


def one_line(exc: BaseException) -> str:
    """The exception as one line that names the file when the exception knows it."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {exc.filename}"
    else:
        text = str(exc).strip() or type(exc).__name__
        if not isinstance(exc, (ValueError, RuntimeError, ImportError)):
            text = f"{type(exc).__name__}: {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."


def run_reporting(prog: str, func, debug: bool) -> int:
    """Run `func()`; turn an exception into one line on stderr and an exit code."""
    try:
        func()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that reports every failure
        if debug:
            raise
        code = 2 if isinstance(exc, UsageError) else 1
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return code
    return 0
