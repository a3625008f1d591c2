"""Command line: ``deqdiff <job> [options]``.

Each job lives in its own module of this package and exposes ``register(subparsers)``, which adds
its sub-parser and sets ``func`` (called with the parsed arguments, returns the exit code).
Job modules import their heavy dependencies inside ``func`` so that ``deqdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: job modules, in the order ``deqdiff --help`` lists them
JOBS = ("demo", "pinn", "train", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
