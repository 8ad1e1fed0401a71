"""The one error boundary every edge CLI runs behind (edge-export, edge-run, edge-eval, edge-bench).

Every failure ends as ONE line on stderr, ``<prog>: error: <file or field>: <what was expected, what
was found>``, and an exit status: 1 for a failure, 2 for a usage error (argparse's own, and
``UsageError``), 130 for Ctrl-C. No traceback unless ``--debug`` (or ``EDGE_DEBUG=1``) asks for it.

What counts as expected: ``EdgeError`` (edge's refusals), ``OSError`` (missing, unreadable or
unwritable files, a read-only or full file system), ``ValueError`` (bad input), ``MemoryError`` and
``KeyboardInterrupt``. Anything else is a bug in edge: still one line, saying so and how to get the
traceback.

Also here, because several CLIs need them: argparse types with bounds (``bounded_int``), and
``check_writable``, which proves an output path can be written before any long work starts.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from edge.errors import EdgeError

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_FLAG = "--debug"
MAX_MESSAGE_CHARS = 2000  # one line, not a dump


class UsageError(EdgeError):
    """Flags that contradict each other or are out of bounds (exit status 2, like argparse's)."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on failure, print the Python traceback too (also: EDGE_DEBUG=1)")


def one_line(text: str) -> str:
    """Collapse a message to one line (errors from libraries often span several) and bound it."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    line = "; ".join(parts) or "(no message)"
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 3] + "..."


def _os_message(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    code = errno.errorcode.get(e.errno or -1)
    hint = {errno.ENOSPC: " (the file system is full)", errno.EROFS: " (the file system is read-only)",
            errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno or -1, "")
    where = ""
    if e.filename is not None:
        where = f"{os.fsdecode(e.filename)}: "
        if getattr(e, "filename2", None) is not None:
            where = f"{os.fsdecode(e.filename)} -> {os.fsdecode(e.filename2)}: "
    return f"{where}{what}{f' [{code}]' if code else ''}{hint}"


def describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for a failure."""
    if isinstance(e, KeyboardInterrupt):  # a CLI may re-raise it with what the interruption left
        return one_line(str(e) or "interrupted (Ctrl-C)"), EXIT_INTERRUPTED
    if isinstance(e, UsageError):
        return one_line(str(e)), EXIT_USAGE
    if isinstance(e, EdgeError):
        return one_line(str(e)), EXIT_FAILURE
    if isinstance(e, OSError):
        return one_line(_os_message(e)), EXIT_FAILURE
    if isinstance(e, MemoryError):
        return one_line(f"out of memory ({e or 'MemoryError'}); use a smaller --context or model"), EXIT_FAILURE
    if isinstance(e, (ValueError, RecursionError)):
        return one_line(str(e) or type(e).__name__), EXIT_FAILURE
    return one_line(f"internal error, a bug in edge ({type(e).__name__}: {e}); rerun with {DEBUG_FLAG} for "
                    f"the traceback"), EXIT_FAILURE


def _wants_debug(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return DEBUG_FLAG in args or os.environ.get("EDGE_DEBUG", "") not in ("", "0")


def report(prog: str, e: BaseException, debug: bool = False) -> int:
    """Print the one-line error (after the traceback when ``debug``) and return the exit status."""
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    message, status = describe(e)
    if isinstance(e, BrokenPipeError):
        try:  # stdout's reader went away (| head): stop writing there, and keep exit quiet about it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    try:
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return status


def cli_boundary(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a CLI's ``main(argv=None) -> int``: every exception it lets out becomes one line and an
    exit status (see the module doc). argparse's own exits (``SystemExit``) pass through unchanged."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def boundary(argv: list[str] | None = None, *args, **kwargs) -> int:
            try:
                return main(argv, *args, **kwargs)
            except SystemExit:
                raise
            except BaseException as e:  # noqa: B902 - the boundary: everything ends as one line
                return report(prog, e, _wants_debug(argv))
        return boundary
    return wrap


# ---------------------------------------------------------------- argparse types


def bounded_int(minimum: int | None = None, maximum: int | Callable[[], int] | None = None,
                note: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer in [minimum, maximum] (maximum may be computed, e.g. from
    the CPU count); anything else is a usage error naming the bounds."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        top = maximum() if callable(maximum) else maximum
        if (minimum is not None and value < minimum) or (top is not None and value > top):
            lo = "" if minimum is None else f">= {minimum}"
            hi = "" if top is None else f"<= {top}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}{note}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


# ---------------------------------------------------------------- output paths


def check_writable(path: str | os.PathLike, what: str, make_parents: bool = False) -> Path:
    """Prove ``path`` can be written (created or appended to) now, before the work whose result goes
    there: an error naming ``what`` (the flag) otherwise. A file this creates is removed again
    (folders made for it with ``make_parents`` stay: the result will go there)."""
    p = Path(path)
    if make_parents:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EdgeError(f"{what} {p}: cannot create its folder ({e.strerror or e})") from None
    if p.is_dir():
        raise EdgeError(f"{what} {p}: is a folder; expected a file path")
    existed = p.exists()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise EdgeError(f"{what} {p}: cannot be written ({e.strerror or e})") from None
    os.close(fd)
    if not existed:
        try:
            p.unlink()
        except OSError:
            pass
    return p
