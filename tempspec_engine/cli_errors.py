"""One error contract for every command line of the project (`tempspec`, `tempspec-train`, the benchmark scripts).

- A mistake in the arguments or inputs (the project's ValueErrors, missing or unreadable files, a GPU that is not
  there, non-finite model output) ends in one line on stderr, `<prog>: error: <what>`, and exit status 2.
- Ctrl-C ends in one line, `<prog>: interrupted`, and exit status 130 (long jobs save their work first and say
  where, in the same line).
- Anything else is a bug: one line saying so, exit status 1.
- `--debug` (every command has it) or TEMPSPEC_DEBUG=1 lets the exception and its traceback through instead.

Usage: `OneLineParser` for the argument parser (its usage errors are one line too) and `run_command(prog, fn, debug)`
around the command's body.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from tempspec_engine.backends import BackendUnavailableError

DEBUG_ENV = "TEMPSPEC_DEBUG"
# errors that describe the user's input or machine, not a bug: reported in one line
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, BackendUnavailableError)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `<prog>: error: <message> (see <prog> --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug, accepted before and after a subcommand (read it with getattr(args, "debug", False))."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the full traceback of an error (default: off; also: {DEBUG_ENV}=1)")


def debug_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(exc: BaseException) -> str:
    """One line for an exception: an OSError names its file, other messages keep their first line."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):  # str(KeyError('x')) is "'x'"
        text = f"missing key {text}"
    return " ".join(text.split())


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Runs `body` under the contract above; returns the exit status."""
    if debug_requested(debug):
        return body()
    try:
        return body()
    except KeyboardInterrupt as exc:  # a long job may say where it saved its work: "saved ...; continue with ..."
        sys.stderr.write(f"{prog}: interrupted{': ' + describe(exc) if str(exc) else ''}\n")
        return 130
    except EXPECTED_ERRORS as exc:
        sys.stderr.write(f"{prog}: error: {describe(exc)}\n")
        return 2
    except Exception as exc:  # a bug: say so in one line, and how to see the traceback
        sys.stderr.write(f"{prog}: internal error: {type(exc).__name__}: {describe(exc)} (rerun with --debug or "
                         f"{DEBUG_ENV}=1 for the traceback, and please report it)\n")
        return 1
