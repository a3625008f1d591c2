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
from typing import Any, Callable, Iterator, Mapping

__all__ = [
    "UsageError", "OneLineParser", "user_errors", "one_line", "out_dir", "positive_int", "nonneg_int",
    "positive_float", "nonneg_float", "finite_float", "seed", "open_unit", "int_list", "float_list",
    "str_list", "optional", "check_device", "check_solver", "add_run_flags", "given_settings", "flagged",
    "resumed_settings", "config_defaults_help", "distributed_job", "disk_errors", "set_threads",
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


def optional(item: Callable[[str], object], words: tuple[str, ...] = ("none",),
             what: str | None = None) -> Callable[[str], object]:
    """``item``'s value, or None for any of ``words`` (any case): ``optional(nonneg_int)`` reads
    ``--max-steps none``; ``what`` names the accepted values (default: ``item``'s, "or 'none'")."""
    def parse(text: str):
        return None if text.lower() in words else item(text)

    parse.__name__ = what or f"{item.__name__} or '{words[0]}'"
    return parse


# --- the run flags the training jobs share: one type, choice and default each -----------------

#: argparse settings of each shared run flag (``help`` is the default text; jobs may word it for their run)
RUN_FLAGS: dict[str, dict[str, Any]] = {
    "device": dict(help="cpu, cuda, cuda:1, …"),
    "dtype": dict(choices=("float32", "float64")),
    "seed": dict(type=seed),
    "checkpoint_every": dict(type=nonneg_int),
    "max_steps": dict(type=optional(nonneg_int)),
    "threads": dict(type=nonneg_int, default=1, help="torch CPU threads (0: torch's default)"),
    "no_progress": dict(action="store_true", default=False, help="no progress bar"),
}


def add_run_flags(add: Callable[..., object], defaults: Mapping[str, object] | None = None, **helps: str | None) -> None:
    """Add the shared run flags named by ``helps`` (:data:`RUN_FLAGS`: ``device``, ``dtype``,
    ``seed``, ``checkpoint_every``, ``max_steps``, ``threads``, ``no_progress``), in that
    order, through ``add`` (a parser's or group's ``add_argument``). Each value is the flag's
    help for this job (None: :data:`RUN_FLAGS`' own); ``defaults`` overrides defaults by name.
    ``KeyError`` for a name that is not a shared run flag."""
    for name, text in helps.items():
        spec = dict(RUN_FLAGS[name])
        if text is not None:
            spec["help"] = text
        if defaults and name in defaults:
            spec["default"] = defaults[name]
        add(flag_of(name), **spec)


def set_threads(threads: int) -> None:
    """``--threads``: torch's CPU threads (0 leaves torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` without the uninformative "(default: None)" and
    "(default: False)" of optional values and switches."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def config_defaults_help(config: Callable[[], object], skip: tuple[str, ...] = ()) -> type:
    """A help formatter that shows each setting's default from ``config()`` (a fresh config of
    the job; called only when help is printed, so the job's module loads lazily): its flags
    default to "not given" (``argparse.SUPPRESS``) so that ``--resume`` can tell the flags given
    from the checkpoint's settings. No default is shown for None, False or the names in ``skip``."""

    class Help(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):
            text = action.help or ""
            default = getattr(config(), action.dest, None) if action.default is argparse.SUPPRESS else action.default
            if "%(default)" in text or default is None or default is False or action.dest in ("help", *skip):
                return text
            return f"{text} (default: {default})"

    return Help


# --- settings from flags, resumed runs, errors while running ------------------------------------

def given_settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The settings among ``names`` given on the command line (flags that default to "not given")."""
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def flagged(err: ValueError, names, flag: Callable[[str], str] = flag_of) -> UsageError:
    """A config's ``ValueError`` (its message starts with the setting's name) as a
    :class:`UsageError` naming the setting's flag when the setting is among ``names``."""
    name = str(err).split(" ", 1)[0]
    return UsageError(f"{flag(name)}: {one_line(err)}" if name in names else one_line(err))


def resumed_settings(out: str | os.PathLike, given: dict, read: Callable[[Path], dict], resumable, *,
                     note: str = "", name: Callable[[str], str] = flag_of) -> tuple[dict, Path]:
    """``--resume``: the settings saved in ``OUT/checkpoint.pt`` (``read`` loads it) and its path.
    :class:`UsageError` if there is no checkpoint, it cannot be read, or a setting ``given``
    anew differs from the saved one and is not among ``resumable`` (each named by ``name``,
    the message ending with ``note``)."""
    ckpt = resume_checkpoint(out)
    with user_errors("--resume"):
        saved = dict(read(ckpt)["config"])
    changed = sorted(k for k, v in given.items() if k not in resumable and k in saved and saved[k] != v)
    if changed:
        what = ", ".join(f"{name(k)} {given[k]} (checkpoint: {saved[k]})" for k in changed)
        raise UsageError(f"--resume: {what} would not continue the run in {out}; a resumed run keeps its settings{note}")
    return saved, ckpt


@contextmanager
def distributed_job(device: str):
    """The job's :class:`~deqdiff.training.DistContext`: joins the process group torchrun
    describes (single process otherwise) and leaves it when the job ends."""
    import torch.distributed as dist

    from ..training import init_from_env

    ctx = init_from_env(device)
    try:
        yield ctx
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def disk_errors(out: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` while the job writes (e.g. the disk filled up with a checkpoint) as a
    :class:`UsageError` naming ``--out``."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"--out {out}: {one_line(err)}") from err


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
