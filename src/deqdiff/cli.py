"""Command line: ``deqdiff <job> [options]``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqdiff", description="Deep equilibrium models, differentiated implicitly to every order.")
    sub = parser.add_subparsers(dest="job", required=True)
    demo = sub.add_parser("demo", help="check derivatives of orders 1-3 of a small DEQ against unrolled autodiff")
    demo.add_argument("--n", type=int, default=16, help="state width")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--rho", type=float, default=0.6, help="spectral norm of A (contraction factor)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--solver", default="anderson", help="forward solver")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.job == "demo":
        from . import demo

        return demo.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
