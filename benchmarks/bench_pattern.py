"""The physics-informed step as users write it, with deqdiff's defaults, against unrolling.

    PYTHONPATH=src python benchmarks/bench_pattern.py            # both regimes (~5 min, 2 cores)
    PYTHONPATH=src python benchmarks/bench_pattern.py --quick    # smoke run
    PYTHONPATH=src python benchmarks/bench_pattern.py --dy-dt forward   # dy/dt by forward_ad (or jvp: torch.func.jvp)

The pattern (Pacheco 2023, "Second derivative (and further) of deep equilibrium models":
dy/dt by an implicit solve, then the gradient of an ODE residual w.r.t. the weights)::

    z = deqdiff.fixed_point(f, torch.zeros(N, n), A, Bt, b, t, tol=1e-5)   # every other argument default
    y = z @ C.T
    dy = [torch.autograd.grad(y[:, i].sum(), t, create_graph=True)[0] for i in range(2)]
    loss = van_der_pol_residual(y, dy)
    torch.autograd.grad(loss, [A, Bt, b, C])

with f(z, A, Bt, b, t) = tanh(z Aᵀ + t Btᵀ + b), t = linspace(0, 5, N). The baseline runs the
same step through K plain iterations recorded by autograd, K = the iterations plain iteration
needs to reach the same (global relative) tolerance. Each mode runs in its own process
(float32, 1 thread): peak RSS above a baseline taken after a warm-up on a tiny batch, the
median of ``--repeats`` timed steps with the medians of their parts (the forward solve, the
first-order backward for dy/dt, the second-order backward of the loss: the step as a multiple of
its own forward solve), and a 20-step Adam run on the fixed collocation points.
The deqdiff worker also runs the 20 training steps with ``deqdiff.WarmStart`` (forward and
derivative solves start from the previous step's solutions). Gradients are compared with the
unrolled ones and with a float64 reference at tol 1e-12. ``--flush-denormal`` runs both modes
with subnormal floats flushed to zero: PyTorch's CPU default keeps them, and the unrolled
second-order backward then spends most of its time on subnormal arithmetic (≈ 9× slower on
the hard regime), so both settings are reported.
Results go to ``benchmarks/results/pattern.json``; a one-line machine-speed reference (ms of
one 2000 × 128 tanh layer) is measured in every process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import harness

REGIMES = {"hard": (2000, 128), "narrow": (20000, 32)}


def problem(regime: str, dtype):
    N, n = REGIMES[regime]
    g = torch.Generator().manual_seed(0)
    if regime == "hard":
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        A = 0.95 * Q
    else:
        A = 0.9 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    Bt = torch.randn(n, 1, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    C = torch.randn(2, n, generator=g, dtype=torch.float64) / n**0.5
    t = torch.linspace(0, 5, N, dtype=torch.float64)[:, None]
    return [p.to(dtype).requires_grad_() for p in (A, Bt, b, C, t)]


def f(z, A, Bt, b, t):
    return torch.tanh(z @ A.T + t @ Bt.T + b)


def van_der_pol_residual(y, dy):
    r1 = dy[0] - y[:, 1:2]
    r2 = dy[1] - ((1 - y[:, 0:1] ** 2) * y[:, 1:2] - y[:, 0:1])
    return (r1**2).mean() + (r2**2).mean()


def plain_iterations(A, Bt, b, t, tol: float) -> int:
    with torch.no_grad():
        z, K = torch.zeros(t.shape[0], A.shape[0], dtype=A.dtype), 0
        while K < 100_000:
            fz = f(z, A, Bt, b, t)
            K += 1
            if (fz - z).norm() <= tol * fz.norm():
                return K
            z = fz
    raise RuntimeError("plain iteration did not converge")


#: how the step gets dy/dt: reverse mode per output (the pattern above), forward-mode AD
#: (``torch.autograd.forward_ad``), or ``torch.func.jvp``; each with one tangent along t
DY_DT = ("reverse", "forward", "jvp")


def step(mode: str, params, K: int, tol: float, warm=None, phases: dict | None = None, dy_dt: str = "reverse"):
    """One step of the pattern; ``phases`` (optional) receives the seconds of its three parts:
    the forward solve, the first-order backward for dy/dt, the second-order backward of the loss
    (with forward-mode ``dy_dt`` the first two are one pass, counted as the forward solve)."""
    import deqdiff

    A, Bt, b, C, t = params

    def output(t):
        if mode == "unrolled":
            z = torch.zeros(t.shape[0], A.shape[0], dtype=A.dtype)
            for _ in range(K):
                z = f(z, A, Bt, b, t)
        else:
            z = deqdiff.fixed_point(f, torch.zeros(t.shape[0], A.shape[0], dtype=A.dtype), A, Bt, b, t, tol=tol,
                                    warm_start=warm)
        return z @ C.T

    t0 = time.perf_counter()
    if dy_dt == "reverse":
        y = output(t)
        t1 = time.perf_counter()
        dy = [torch.autograd.grad(y[:, i].sum(), t, create_graph=True)[0] for i in range(2)]
    else:
        if dy_dt == "forward":
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                y, y_t = fwAD.unpack_dual(output(fwAD.make_dual(t, torch.ones_like(t))))
        else:
            y, y_t = torch.func.jvp(output, (t,), (torch.ones_like(t),))
        t1 = time.perf_counter()
        dy = [y_t[:, 0:1], y_t[:, 1:2]]
    t2 = time.perf_counter()
    loss = van_der_pol_residual(y, dy)
    grads = torch.autograd.grad(loss, [A, Bt, b, C])
    if phases is not None:
        for name, s in (("forward", t1 - t0), ("dy_dt", t2 - t1), ("loss_grad", time.perf_counter() - t2)):
            phases.setdefault(name, []).append(s)
    return loss, grads


def train(mode: str, params, K: int, spec: dict, warm) -> tuple[float, float]:
    """``spec["train_steps"]`` Adam steps on the fixed collocation points: (seconds, final loss)."""
    train_params = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(train_params[:4], lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(spec["train_steps"]):
        loss, g = step(mode, train_params, K, spec["tol"], warm, dy_dt=spec["dy_dt"])
        for p, gi in zip(train_params[:4], g):
            p.grad = gi
        opt.step()
    return time.perf_counter() - t0, float(loss)


def worker(spec: dict) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(spec["flush_denormal"])
    regime, mode, repeats = spec["regime"], spec["mode"], spec["repeats"]
    dy_dt = spec["dy_dt"]
    params = problem(regime, torch.float32)
    K = plain_iterations(*(p.detach() for p in (params[0], params[1], params[2], params[4])), spec["tol"])
    tiny = [p.detach().clone().requires_grad_() for p in params]
    tiny[4] = tiny[4][:16].detach().requires_grad_()
    step(mode, tiny, 5, spec["tol"], dy_dt=dy_dt)  # warm-up: imports, lazy inits, the allocator's first pools
    first: dict = {}

    def first_step() -> None:
        first["grads"] = step(mode, params, K, spec["tol"], dy_dt=dy_dt)[1]

    peak = harness.peak_rss_growth(first_step).peak_mib
    phases: dict = {}
    times = harness.repeat_times(lambda: step(mode, params, K, spec["tol"], phases=phases, dy_dt=dy_dt),
                                 repeats)
    train_s, loss = train(mode, params, K, spec, None)
    out = dict(regime=regime, mode=mode, K=K, step_median_s=statistics.median(times), step_times_s=times,
               phases_median_s={k: statistics.median(v) for k, v in phases.items()},
               peak_mib=peak, train_s=train_s, train_final_loss=loss, machine_ms=harness.tanh_layer_ms(30, warmup=0),
               grads=[gi.double().flatten().tolist() for gi in first["grads"]])
    if mode == "deqdiff":  # the same training with warm-started solves (deqdiff.WarmStart)
        import deqdiff

        out["train_warm_s"], out["train_warm_final_loss"] = train(mode, params, K, spec, deqdiff.WarmStart())
    return out


def reference_grads(regime: str) -> list:
    import deqdiff

    A, Bt, b, C, t = problem(regime, torch.float64)
    z = deqdiff.fixed_point(f, torch.zeros(t.shape[0], A.shape[0], dtype=torch.float64), A, Bt, b, t, tol=1e-12,
                            max_iter=2000)
    y = z @ C.T
    dy = [torch.autograd.grad(y[:, i].sum(), t, create_graph=True)[0] for i in range(2)]
    g = torch.autograd.grad(van_der_pol_residual(y, dy), [A, Bt, b, C])
    return [gi.flatten() for gi in g]


def rel(a: list, ref: list) -> float:
    a = torch.cat([torch.tensor(x, dtype=torch.float64) for x in a])
    r = torch.cat(ref)
    return float((a - r).norm() / r.norm())


def table(paths: list[Path]) -> str:
    """Markdown rows of the summaries in ``paths`` (one results file per denormal setting)."""
    columns = ["regime", "subnormals", "K", "unrolled s", "deqdiff s", "speed-up", "unrolled MiB", "deqdiff MiB",
               "memory ratio", "20 Adam steps: unrolled / cold / warm s", "training speed-up cold / warm",
               "grad rel. vs unrolled", "vs float64: deqdiff / unrolled", "tanh-layer ms"]
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        mode = "flushed" if data["flush_denormal"] else "kept (default)"
        for regime, r in data["regimes"].items():
            s = r["summary"]
            rows.append([
                regime, mode, s["K"], f"{s['unrolled_s']:.2f}", f"{s['deqdiff_s']:.2f}", f"{s['speedup']:.2f}×",
                f"{s['unrolled_peak_mib']:.0f}", f"{s['deqdiff_peak_mib']:.0f}", f"{s['memory_ratio']:.1f}×",
                f"{s['train20_unrolled_s']:.1f} / {s['train20_deqdiff_s']:.1f} / {s['train20_deqdiff_warm_s']:.1f}",
                f"{s['train_speedup']:.2f}× / {s['train_speedup_warm']:.2f}×", f"{s['grad_rel_deqdiff_vs_unrolled']:.1e}",
                f"{s['grad_rel_deqdiff_vs_f64']:.1e} / {s['grad_rel_unrolled_vs_f64']:.1e}", f"{s['machine_ms'][0]:.2f}"])
    return harness.markdown_table(columns, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True) in both modes (off is PyTorch's default on CPU)")
    ap.add_argument("--dy-dt", choices=DY_DT, default="reverse",
                    help="how dy/dt is taken: reverse mode per output (the pattern), forward_ad, or torch.func.jvp")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the saved results")
    args = ap.parse_args()
    if args.table:
        res = Path(__file__).parent / "results"
        print(table([p for p in (res / "pattern.json", res / "pattern_flush.json") if p.exists()]))
        return
    regimes = ["hard"] if args.quick else list(REGIMES)
    out: dict = {"command": " ".join(["python", *sys.argv]), "flush_denormal": args.flush_denormal,
                 "dy_dt": args.dy_dt, "regimes": {}}
    for regime in regimes:
        rows = {}
        for mode in ("unrolled", "deqdiff"):
            spec = dict(regime=regime, mode=mode, repeats=2 if args.quick else args.repeats, tol=args.tol,
                        train_steps=3 if args.quick else 20, flush_denormal=args.flush_denormal, dy_dt=args.dy_dt)
            rows[mode] = harness.call_isolated(worker, spec).data  # each mode in a fresh process
        ref = reference_grads(regime)
        u, d = rows["unrolled"], rows["deqdiff"]
        summary = dict(
            K=u["K"], machine_ms=[u["machine_ms"], d["machine_ms"]],
            unrolled_s=u["step_median_s"], deqdiff_s=d["step_median_s"],
            speedup=u["step_median_s"] / d["step_median_s"],
            unrolled_peak_mib=u["peak_mib"], deqdiff_peak_mib=d["peak_mib"],
            memory_ratio=u["peak_mib"] / max(d["peak_mib"], 1e-9),
            train20_unrolled_s=u["train_s"], train20_deqdiff_s=d["train_s"], train20_deqdiff_warm_s=d["train_warm_s"],
            train_speedup=u["train_s"] / d["train_s"], train_speedup_warm=u["train_s"] / d["train_warm_s"],
            train_final_loss=[u["train_final_loss"], d["train_final_loss"], d["train_warm_final_loss"]],
            grad_rel_deqdiff_vs_unrolled=rel(d["grads"], [torch.tensor(x, dtype=torch.float64) for x in u["grads"]]),
            grad_rel_deqdiff_vs_f64=rel(d["grads"], ref), grad_rel_unrolled_vs_f64=rel(u["grads"], ref),
            # the step as a multiple of its own forward solve, and its parts (medians, s)
            step_over_forward=[r["step_median_s"] / r["phases_median_s"]["forward"] for r in (u, d)],
            phases_s={m: r["phases_median_s"] for m, r in rows.items()},
        )
        for r in rows.values():
            r.pop("grads")
        out["regimes"][regime] = dict(summary=summary, runs=rows)
        print(regime, json.dumps(summary, indent=1), flush=True)
    name = ("pattern" + ("_flush" if args.flush_denormal else "") + ("" if args.dy_dt == "reverse" else f"_{args.dy_dt}")
            + ("_quick" if args.quick else ""))
    path = harness.write_json(Path(__file__).parent / "results" / f"{name}.json", out)
    print("wrote", path)


if __name__ == "__main__":
    main()
