"""``deqdiff demo``: derivatives of orders 1–3 of a small DEQ checked against unrolled autodiff."""

from __future__ import annotations

import argparse

from ._common import check_solver, open_unit, positive_int, seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="check derivatives of orders 1-3 of a small DEQ against unrolled autodiff")
    p.add_argument("--n", type=positive_int, default=16, help="state width")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--rho", type=open_unit, default=0.6,
                   help="spectral norm of A (contraction factor in (0, 1): the unrolled reference must converge)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--solver", default="anderson", help="forward solver")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .. import demo

    check_solver(args.solver)
    return demo.main(args)
