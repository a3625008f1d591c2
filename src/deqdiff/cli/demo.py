"""``deqdiff demo``: derivatives of orders 1–3 of a small DEQ checked against unrolled autodiff."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="check derivatives of orders 1-3 of a small DEQ against unrolled autodiff")
    p.add_argument("--n", type=int, default=16, help="state width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rho", type=float, default=0.6, help="spectral norm of A (contraction factor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default="anderson", help="forward solver")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .. import demo

    return demo.main(args)
