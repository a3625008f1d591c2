"""Anderson's restart safeguard: iterations and time with and without it, next to plain iteration.

Run from the repository root (one thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_anderson.py          # ~2 min
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_anderson.py --quick  # ~20 s

Solvers (``deqdiff.solvers``, every row stops at ‖g(z) − z‖ ≤ tol·‖g(z)‖, from z = 0):
``fixed_point`` (plain iteration), ``anderson`` with ``restart=None`` (no safeguard, the
behaviour before 2026-11-25) and ``anderson`` (default: a row whose residual grew drops its
history and takes a plain step, at most 50 times). Problems:

* ``pideq-epoch18``: the PIDEQ setup (``deqdiff pinn vdp --setup pideq``: 80 states, free A)
  after 18 Adam epochs — where the unsafeguarded forward solve failed and training derailed —
  at 1000 fresh collocation points, float32, tol 1e-4;
* ``pideq-unrolled-epoch19``: the unrolled-Anderson baseline's model of that setup after 19
  epochs (trained with a budget of 20 restarts, too few there: the default is 50);
* ``pinn-init`` / ``pinn-hard``: the two regimes of ``benchmarks/bench_pinn.py`` (10⁴ points);
* ``tanh-ρ``: ``tanh(W z + x)``, ``W = 0.3ρ·G`` (G standard Gaussian 64 × 64), ``x ~ N(0, 4)``,
  2000 rows — large inputs, where plain iteration fails on some rows;
* ``monotone-s``: the monotone ReLU DEQs of ``tests/solvers/test_splitting.py`` (seeds 0–7,
  float64, tol 1e-10): plain iteration diverges, Anderson must still converge.

Reported: max / mean iterations over rows, rows unconverged after ``--max-iter``, median wall
time of ``--repeats`` solves. Results: ``benchmarks/results/anderson.json`` and ``anderson.md``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "solvers"))

import harness  # noqa: E402
from deqdiff.solvers import get_solver  # noqa: E402

VARIANTS = {"plain iteration": ("fixed_point", {}), "anderson, no restart": ("anderson", {"restart": None}),
            "anderson, ≤ 20 restarts": ("anderson", {"max_restarts": 20}), "anderson (default)": ("anderson", {})}


def pideq_epoch18():
    """The implicit model after 18 epochs of a hand-written loop (no restart then)."""
    from deqdiff.physics.vdp import VdPConfig, build_model, build_loss

    cfg = VdPConfig.for_setup("pideq", epochs=18)
    torch.manual_seed(0)
    model, loss = build_model(cfg), build_loss(cfg)
    model.deq.solver_options["restart"] = None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ic = (torch.zeros(1, 1), torch.tensor([[0.0, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(cfg.epochs):
            opt.zero_grad()
            loss(model, torch.rand(1000, 1, generator=gen) * 2, ic=ic, generator=gen).total.backward()
            opt.step()
    x = torch.rand(1000, 1, generator=torch.Generator().manual_seed(5)) * 2
    cell = model.cell.requires_grad_(False)
    return (lambda z: cell(z, x)), torch.zeros(1000, 80), 1e-4


def pideq_unrolled_epoch19():
    """The unrolled-Anderson baseline's model after 19 epochs of ``deqdiff pinn vdp --setup
    pideq --model unrolled`` trained with a budget of 20 restarts (the first default), at its
    next batch: 20 was too few there, hence 50."""
    from deqdiff.physics.vdp import VdPConfig, build_trainer

    tr = build_trainer(VdPConfig.for_setup("pideq", model="unrolled", epochs=60, lr_final=1e-3))
    tr.model.deq.solver_options["max_restarts"] = 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(19):
            tr.step()
    x = torch.cat([tr.sample_fn(tr.generator, tr.step_count), torch.zeros(1, 1)])
    cell = tr.model.cell.requires_grad_(False)
    return (lambda z: cell(z, x)), torch.zeros(1001, 80), 1e-4


def pinn_regime(regime: str):
    import bench_pinn

    model = bench_pinn.build_model("deqdiff", regime, torch.float32, "cpu").requires_grad_(False)
    t, _ = bench_pinn.collocation(10_000, torch.float32, "cpu")
    return (lambda z: model.cell(z, t)), torch.zeros(10_000, bench_pinn.WIDTH), 1e-4


def tanh_wide(rho: float):
    g = torch.Generator().manual_seed(1)
    W = 0.3 * rho * torch.randn(64, 64, generator=g)
    x = 2 * torch.randn(2000, 64, generator=g)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(2000, 64), 1e-4


def monotone(seed: int):
    default = torch.get_default_dtype()
    try:
        from test_splitting import problem  # sets float64 as the default dtype on import

        torch.set_default_dtype(torch.float64)
        gen = torch.Generator().manual_seed(100 + seed)
        m = float(torch.empty(()).uniform_(0.05, 0.5, generator=gen))
        scale = float(torch.empty(()).uniform_(0.3, 1.5, generator=gen))
        _, f, W, c = problem(seed, n=10 + seed, S=3, m=m, scale=scale)
    finally:
        torch.set_default_dtype(default)
    return (lambda z: f(z, W, c)), torch.zeros_like(c), 1e-10


def measure(g, z0, tol, solver, opts, max_iter, repeats):
    last = {}

    def solve() -> None:
        with torch.no_grad():
            last["info"] = get_solver(solver, "forward")(g, z0, tol=tol, max_iter=max_iter, **opts)[1]

    times = harness.repeat_times(solve, repeats)
    info = last["info"]
    it = info.iterations.float()
    return dict(max=int(it.max()), mean=round(float(it.mean()), 2), unconverged=int((~info.converged).sum()),
                rows=int(it.numel()), time_s=statistics.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problems = {"pideq-epoch18": pideq_epoch18, "pideq-unrolled-epoch19": pideq_unrolled_epoch19,
                "tanh-0.6": lambda: tanh_wide(0.6), "tanh-0.9": lambda: tanh_wide(0.9),
                "tanh-0.99": lambda: tanh_wide(0.99), **{f"monotone-{s}": (lambda s=s: monotone(s)) for s in range(8)}}
    if not args.quick:
        problems.update({"pinn-init": lambda: pinn_regime("init"), "pinn-hard": lambda: pinn_regime("hard")})
    repeats = 1 if args.quick else args.repeats
    rows = []
    for name, build in problems.items():
        g, z0, tol = build()
        res = {v: measure(g, z0, tol, s, o, args.max_iter, repeats) for v, (s, o) in VARIANTS.items()}
        rows.append(dict(problem=name, tol=tol, **res))
        print(name, {v: (r["max"], r["mean"], r["unconverged"]) for v, r in res.items()}, flush=True)
    m = harness.machine_info("machine", "torch")
    cells = [[f"{r['problem']} ({r['tol']:g})"] + [
        f"{r[v]['max']} / {r[v]['mean']:.1f}, {r[v]['unconverged']}/{r[v]['rows']}, {1000 * r[v]['time_s']:.0f} ms"
        for v in VARIANTS] for r in rows]
    lines = [f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_anderson.py{' --quick' if args.quick else ''}`  ",
             f"Date: {datetime.date.today()}; {m['machine']}, torch {m['torch']}, 1 thread, "
             f"max {args.max_iter} iterations. Cells: iterations max / mean, rows unconverged of all, median ms.", "",
             harness.markdown_table(["problem (tol)", *VARIANTS], cells)]
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    suffix = "_quick" if args.quick else ""
    harness.write_json(out / f"anderson{suffix}.json", dict(rows=rows, quick=args.quick, date=str(datetime.date.today())))
    (out / f"anderson{suffix}.md").write_text(md)


if __name__ == "__main__":
    main()
