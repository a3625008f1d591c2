"""Command line: ``deqdiff <job> [options]``.

Each job lives in its own module of this package and exposes ``register(subparsers)``, which adds
its sub-parser and sets ``func`` (called with the parsed arguments, returns the exit code).
Job modules import their heavy dependencies inside ``func`` so that ``deqdiff --help`` stays fast.

Bad input is one line on stderr, ``deqdiff <job>: error: ...``, and exit code 2, never a
traceback: argparse errors exit through :class:`~deqdiff.cli._common.OneLineParser`, and a job's
:class:`~deqdiff.cli._common.UsageError` makes :func:`main` return 2 (see ``_common``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._common import OneLineParser, UsageError, fail

#: job modules, in the order ``deqdiff --help`` lists them (a module's job name is its own; a module
#: not written yet is skipped)
JOBS = ("demo", "pinn", "train", "analyze", "lm", "inverse", "operator", "fit_solver")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="deqdiff", description="Deep equilibrium models, differentiated implicitly to every order.")
    sub = parser.add_subparsers(dest="job", required=True)
    for name in JOBS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:  # a job not written yet
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _prog(args: argparse.Namespace) -> str:
    """``deqdiff <job> [<problem or tool>]`` of the parsed command line."""
    sub = {"pinn": "problem", "analyze": "tool", "inverse": "task", "operator": "problem"}.get(args.job)
    return " ".join(["deqdiff", args.job] + ([str(getattr(args, sub))] if sub and getattr(args, sub, None) else []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        return fail(_prog(args), err)


if __name__ == "__main__":
    sys.exit(main())
