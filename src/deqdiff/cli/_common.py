"""What every job shares: one-line usage errors, flag validators and output-folder checks.

A bad command line never ends in a traceback: argparse errors (including the validators below,
which run as argparse ``type=`` functions and so name their flag) and :class:`UsageError`
raised by a job both print ``deqdiff <job>: error: <one line>`` to stderr and exit with 2.
Jobs turn the library's *expected* input errors into :class:`UsageError` with
:func:`user_errors` around their setup (config, data, checkpoint, output folder), and leave the
training itself unwrapped, so a genuine bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "UsageError", "OneLineParser", "user_errors", "one_line", "out_dir", "positive_int", "nonneg_int",
    "positive_float", "nonneg_float", "finite_float", "seed", "open_unit", "int_list", "float_list",
    "str_list", "check_device", "check_solver",
]

#: the kinds of exception that mean bad input (files, values, data formats), not a bug
EXPECTED = (ValueError, TypeError, OSError, zlib.error)


class UsageError(Exception):
    """Bad input to a job: printed as one line (``deqdiff <job>: error: ...``), exit code 2."""


def one_line(text: str) -> str:
    """``text`` on one line (exception messages may span several)."""
    return " ".join(str(text).split())


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on errors: the error is one line (help: ``-h``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} -h')\n")


@contextmanager
def user_errors(flag: str | None = None, kinds: tuple[type[BaseException], ...] = EXPECTED) -> Iterator[None]:
    """Turn the expected error ``kinds`` raised inside into a :class:`UsageError` (prefixed with
    ``flag`` when the input that failed is known)."""
    try:
        yield
    except UsageError:
        raise
    except kinds as err:
        msg = one_line(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in msg:
            msg = f"{msg}: {err.filename}"
        raise UsageError(f"{flag}: {msg}" if flag and not msg.startswith(flag) else msg) from err


def flag_of(name: str) -> str:
    """The command-line flag of a setting: ``"max_steps"`` → ``"--max-steps"``."""
    return "--" + name.replace("_", "-")


def resume_checkpoint(out: str | os.PathLike, resume: object = True) -> Path:
    """The checkpoint ``--resume`` names: ``OUT/checkpoint.pt`` (``resume`` True) or the path
    given; a missing file is a :class:`UsageError` naming the flag."""
    path = Path(out) / "checkpoint.pt" if resume is True else Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    return path


def out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) and check that files can be written
    there; ``UsageError`` naming ``flag`` if it is a file or not writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {p}: cannot create the directory ({one_line(err.strerror or err)})") from err
    probe = p / f".deqdiff-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{flag} {p}: cannot write there ({one_line(err.strerror or err)})") from err
    return p


# --- argparse ``type=`` validators: their ArgumentTypeError names the flag --------------------

def _number(kind: Callable, text: str, what: str):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def _bounded(kind: Callable, what: str, ok: Callable) -> Callable[[str], object]:
    def parse(text: str):
        v = _number(kind, text, what)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what
    return parse


positive_int = _bounded(int, "an integer ≥ 1", lambda v: v >= 1)
nonneg_int = _bounded(int, "an integer ≥ 0", lambda v: v >= 0)
positive_float = _bounded(float, "a finite number > 0", lambda v: v > 0)
nonneg_float = _bounded(float, "a finite number ≥ 0", lambda v: v >= 0)
finite_float = _bounded(float, "a finite number", lambda v: True)
open_unit = _bounded(float, "a number in (0, 1)", lambda v: 0 < v < 1)
seed = _bounded(int, "a seed in 0..2**32-1", lambda v: 0 <= v < 2 ** 32)  # numpy's seed range


def _list(item: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    parse.__name__ = "list"
    return parse


def int_list(item: Callable[[str], int] = nonneg_int) -> Callable[[str], list]:
    """Comma-separated integers, each checked by ``item``."""
    return _list(item)


def float_list(item: Callable[[str], float] = finite_float) -> Callable[[str], list]:
    return _list(item)


def str_list(text: str) -> list[str]:
    return _list(str)(text)


def check_device(device: str, flag: str = "--device") -> None:
    """``UsageError`` unless ``device`` names a torch device that exists here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"{flag} {device}: not a torch device (cpu, cuda, cuda:1, …)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device}: only cpu and cuda devices are supported")


def check_solver(name: str | None, flag: str = "--solver", extra: tuple[str, ...] = ()) -> None:
    """``UsageError`` unless ``name`` is a registered forward solver (or one of ``extra``)."""
    if name is None:
        return
    from ..solvers import available_solvers

    known = sorted({*available_solvers(), *extra})
    if name not in known:
        raise UsageError(f"{flag} {name}: unknown solver; choose one of {', '.join(known)}")


def fail(prog: str, err: UsageError) -> int:
    """Print ``err`` as ``prog: error: ...`` (one line) and return the exit code 2."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return 2
