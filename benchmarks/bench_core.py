"""Implicit differentiation (deqdiff) vs. unrolled autodiff: time, peak memory, accuracy.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_core.py            # full run (~10 min, 2-core CPU)
    PYTHONPATH=src python benchmarks/bench_core.py --quick    # smoke run (< 1 min)

Model (batched over samples, one fixed point per sample)::

    f(z; A, U, a, b, x, t) = tanh(z Aᵀ + x Uᵀ + t·a + b),   z (B, n), x (B, 2), t (B, 1)
    y = z* c   (one scalar per sample, c fixed)

Regimes: ``hard`` (n=128, B=2000, A = 0.95·orthogonal: spectrum on a circle) and
``narrow`` (n=32, B=20000, A = 0.9·Gaussian/√n).

Methods (all stop at the same rule ‖f(z)−z‖ ≤ tol·‖f(z)‖ per sample, tol = 1e-5):

* ``unrolled``: K plain iterations z ← f(z) recorded by autograd, where K is the number of
  iterations a no-grad run needs to bring *every* sample under tol (K is found once by the
  parent process and is not charged to the unrolled step);
* ``deqdiff``: ``deqdiff.fixed_point`` with forward solver ``fixed_point`` or ``anderson`` and
  backward solver ``auto`` (with ``row_params``: Richardson on running samples, at most n
  iterations each, the rest by a dense LU of those samples) or an explicit one;
* ``torchdeq`` (optional peer): ``get_deq(ift=True)`` with the same forward solver (and the
  same algorithm as backward solver), ``stop_mode='rel'``, the same tolerance.

Quantities: ``fwd`` (forward solve alone, no grad), ``grad`` (a: ∇_θ mean((y−target)²),
θ = A, U, a, b), ``hvp`` (b: ∇_θ⟨∇_θ L, v⟩, first grad with create_graph), ``pinn`` (c:
dy/dt with create_graph, loss mean((dy/dt − g)²) + mean(y²), ∇_θ of that).

Measurement (``benchmarks/harness.py``): every (regime, method, quantity) runs in a fresh
subprocess: a warm-up step on a tiny problem (8 samples; it also triggers the lazy sympy import
of the first ``autograd.grad`` with ``grad_outputs``), then the full problem is built, the
resident high-water mark (``VmHWM``) is reset and read, one step runs, ``VmHWM`` is read again:
the difference is the step's extra peak resident memory (on CUDA: ``max_memory_allocated`` − ``memory_allocated`` before). Then
``--repeats`` more steps are timed (wall clock, ``perf_counter``); the median is reported.
Timing runs in ``--dtype`` (float32 by default, as in training); accuracy is checked in
float64 (plus the timed dtype) against a tight reference. See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import deqdiff
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    import deqdiff
import harness  # noqa: E402  (benchmarks/harness.py: timing, peak memory, fresh processes)

TOL = 1e-5
REF_TOL = 1e-12
MAX_ITER = 3000
# glibc settings of the "live" memory runs: RSS follows the bytes of live tensors
LIVE_ENV = harness.LIVE_RSS_ENV
REGIMES = {
    "hard": dict(n=128, batch=2000, kind="orthogonal", rho=0.95),
    "narrow": dict(n=32, batch=20000, kind="gaussian", rho=0.9),
}
QUICK_BATCH = {"hard": 200, "narrow": 2000}
FWD_SOLVERS = ("fixed_point", "anderson")
ALT_BACKWARD = ("gmres", "richardson", "dense")
TORCHDEQ_NAME = {"fixed_point": "fixed_point_iter", "anderson": "anderson"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------- problem


def f(z, A, U, a, b, x, t):
    """The DEQ cell: tanh(z Aᵀ + x Uᵀ + t·a + b), row-wise over samples."""
    return torch.tanh(z @ A.T + x @ U.T + t * a + b)


class Problem:
    """Weights (A, U, a, b), inputs (x, t), head c, targets and an HVP direction.

    Everything is drawn in float64 from one seed and then cast, so every dtype and every
    batch prefix sees the same numbers."""

    def __init__(self, regime: str, batch: int | None, dtype, device, seed: int = 0):
        cfg = REGIMES[regime]
        n, full, d = cfg["n"], cfg["batch"], 2
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        if cfg["kind"] == "orthogonal":
            A = cfg["rho"] * torch.linalg.qr(r(n, n))[0]
        else:
            A = cfg["rho"] * r(n, n) / math.sqrt(n)
        U, a, bias = r(n, d) / math.sqrt(d), r(n), 0.1 * r(n)
        c, v = r(n) / math.sqrt(n), [r(n, n), r(n, d), r(n), r(n)]
        x, t = r(full, d), torch.rand(full, 1, generator=g, dtype=torch.float64)
        batch = full if batch is None else batch
        x, t = x[:batch], t[:batch]
        cast = lambda u: u.to(dtype=dtype, device=device).contiguous()  # noqa: E731
        self.regime, self.n, self.batch = regime, n, batch
        self.weights = [cast(p).requires_grad_() for p in (A, U, a, bias)]
        self.x, self.t, self.c = cast(x), cast(t), cast(c)
        self.target = torch.sin(3 * self.t[:, 0]) + 0.1 * self.x[:, 0]
        self.g = torch.cos(3 * self.t[:, 0])
        self.v = [cast(u) for u in v]

    @property
    def params(self):
        return (*self.weights, self.x, self.t)

    def z0(self):
        return torch.zeros(self.batch, self.n, dtype=self.x.dtype, device=self.x.device)

    def needs_time_grad(self, flag: bool) -> None:
        self.t.requires_grad_(flag)


def iterations_to_tol(P: Problem, tol: float, max_iter: int = 100_000) -> int:
    """K: plain iterations until every sample meets ‖f(z)−z‖ ≤ tol·‖f(z)‖ (no grad).
    The returned iterate z_K is the one that met the rule, as in deqdiff."""
    z = P.z0()
    with torch.no_grad():
        params = [p.detach() for p in P.params]
        for k in range(max_iter):
            fz = f(z, *params)
            if bool(((fz - z).norm(dim=1) <= tol * fz.norm(dim=1)).all()):
                return k
            z = fz
    raise RuntimeError(f"plain iteration did not reach tol={tol} in {max_iter} steps")


# --------------------------------------------------------------------------- methods


def solve_unrolled(P: Problem, K: int, stats: dict):
    z = P.z0()
    for _ in range(K):
        z = f(z, *P.params)
    stats["iterations"] = K
    return z


def solve_deqdiff(P: Problem, fsolver: str, bsolver: str, tol: float, stats: dict):
    z, info = deqdiff.fixed_point(
        f, P.z0(), *P.params, solver=fsolver, tol=tol, max_iter=MAX_ITER, batch_ndim=1,
        backward_solver=bsolver, return_info=True, row_params=(4, 5),  # x and t are per sample
    )
    stats["info"] = info
    return z


def solve_torchdeq(P: Problem, fsolver: str, tol: float, stats: dict):
    from torchdeq import get_deq

    name = TORCHDEQ_NAME[fsolver]
    core = get_deq(ift=True, f_solver=name, b_solver=name, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
                   f_tol=tol, b_tol=tol, f_stop_mode="rel", b_stop_mode="rel")
    stats.setdefault("backward", [])
    if not torch.is_grad_enabled():
        core.eval()
    params = P.params
    z_out, info = core(lambda z: f(z, *params), P.z0(), backward_writer=stats["backward"].append)
    stats["forward"] = info
    return z_out[-1]


def make_solver(spec: dict, P: Problem):
    """A closure ``solve(stats) -> z*`` for the method described by ``spec``."""
    method = spec["method"]
    if method == "unrolled":
        return lambda st: solve_unrolled(P, spec["K"], st)
    if method == "deqdiff":
        return lambda st: solve_deqdiff(P, spec["fsolver"], spec["bsolver"], spec.get("tol", TOL), st)
    if method == "torchdeq":
        return lambda st: solve_torchdeq(P, spec["fsolver"], spec.get("tol", TOL), st)
    raise ValueError(method)


# --------------------------------------------------------------------------- quantities


def q_fwd(solve, P: Problem, st):
    with torch.no_grad():
        return [solve(st)]


def q_grad(solve, P: Problem, st):
    """(a) ∇_θ mean((y − target)²)."""
    y = solve(st) @ P.c
    return list(torch.autograd.grad(((y - P.target) ** 2).mean(), P.weights))


def q_hvp(solve, P: Problem, st):
    """(b) ∇_θ ⟨∇_θ L, v⟩ (Hessian-vector product)."""
    y = solve(st) @ P.c
    g = torch.autograd.grad(((y - P.target) ** 2).mean(), P.weights, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, P.v))
    return list(torch.autograd.grad(dot, P.weights))


def q_pinn(solve, P: Problem, st):
    """(c) physics-informed: ∇_θ [mean((dy/dt − g)²) + mean(y²)]."""
    y = solve(st) @ P.c
    dy = torch.autograd.grad(y.sum(), P.t, create_graph=True)[0][:, 0]
    loss = ((dy - P.g) ** 2).mean() + (y ** 2).mean()
    return list(torch.autograd.grad(loss, P.weights))


QUANTITIES = {"fwd": q_fwd, "grad": q_grad, "hvp": q_hvp, "pinn": q_pinn}


def make_step(spec: dict, P: Problem):
    P.needs_time_grad(spec["quantity"] == "pinn")
    solve, q = make_solver(spec, P), QUANTITIES[spec["quantity"]]

    def step(st):
        return q(solve, P, st)

    return step


# --------------------------------------------------------------------------- solver statistics


def _iters(t) -> dict:
    t = t.detach().float()
    return {"max": int(t.max()), "mean": round(float(t.mean()), 1)}


def summarize_stats(st: dict) -> dict:
    """Iteration counts of the last step, in JSON form."""
    if "iterations" in st:
        return {"forward": {"max": st["iterations"], "mean": st["iterations"]}, "derivative": []}
    if "info" in st:
        info = st["info"]
        out = {"forward": _iters(info.forward.iterations), "converged": info.forward.all_converged}
        out["derivative"] = [
            {"solver": d.solver, **_iters(d.iterations), "converged": d.all_converged,
             **({"matvecs": d.extra["matvecs"]} if "matvecs" in d.extra else {})}
            for d in info.derivatives
        ]
        return out
    if "forward" in st:
        out = {"forward": _iters(st["forward"]["nstep"]), "derivative": []}
        out["derivative"] = [_iters(b["nstep"]) for b in st.get("backward", [])]
        return out
    return {}


# --------------------------------------------------------------------------- worker: time + memory


def worker_measure(spec: dict) -> dict:
    """Warm up on a tiny problem, then: extra peak memory of one step, then timed repeats
    (or, with ``memory_only``, just the memory of one step)."""
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    tiny = Problem(spec["regime"], 8, dtype, device)
    make_step(spec, tiny)({})  # warm-up: kernels, lazy imports (sympy), allocator
    del tiny
    P = Problem(spec["regime"], spec["batch"], dtype, device)
    step = make_step(spec, P)
    m = harness.measure_step(step, spec["repeats"], device=device, budget_s=spec["budget_s"],
                             memory_only=spec.get("memory_only", False))
    mem = m["memory"]
    if spec.get("memory_only"):
        return {"peak_mib": mem["peak_mib"], "step_s": mem["first_step_s"], "method": f"{mem['method']} under {LIVE_ENV}"}
    return {**spec, "times_s": m["times_s"], "median_s": m["median_s"], "memory": mem,
            "iterations": summarize_stats(m["stats"]), "loadavg_1min_after": os.getloadavg()[0],
            "warnings": sorted({w[:200] for w in m["warnings"]})}


# --------------------------------------------------------------------------- worker: accuracy


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.detach().reshape(-1).to(torch.float64).cpu() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _all_quantities(spec: dict, P: Problem) -> dict:
    out = {}
    for q in ("grad", "hvp", "pinn"):
        step = make_step({**spec, "quantity": q}, P)
        out[q] = _flat(step({}))
    return out


def accuracy_candidates(torchdeq_ok: bool, quick: bool) -> list[dict]:
    cands = [{"method": "unrolled"}]
    for fs in FWD_SOLVERS:
        for bs in ("auto",) if quick else ("auto", *ALT_BACKWARD):
            cands.append({"method": "deqdiff", "fsolver": fs, "bsolver": bs})
    if torchdeq_ok:
        cands += [{"method": "torchdeq", "fsolver": fs} for fs in FWD_SOLVERS[: 1 if quick else None]]
    return cands


def worker_accuracy(spec: dict) -> dict:
    """Relative errors of (a), (b), (c) at tol=1e-5 against a tight float64 reference."""
    regime, batch, device = spec["regime"], spec["batch"], spec["device"]
    P64 = Problem(regime, batch, torch.float64, device)
    ref_spec = {"method": "deqdiff", "fsolver": "fixed_point", "bsolver": "dense", "tol": REF_TOL}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _all_quantities(ref_spec, P64)
        K12 = iterations_to_tol(P64, REF_TOL)
        ref_unrolled = _all_quantities({"method": "unrolled", "K": K12}, P64)
    result = {"regime": regime, "batch": batch, "K_ref": K12,
              "reference": "deqdiff fixed_point tol=1e-12, dense LU backward, float64",
              "reference_vs_unrolled_1e-12": {q: _rel(ref_unrolled[q], ref[q]) for q in ref},
              "rows": []}
    dtypes = ("float64",) if spec["quick"] else ("float64", spec["dtype"])
    for dname in dict.fromkeys(dtypes):
        P = P64 if dname == "float64" else Problem(regime, batch, DTYPES[dname], device)
        K = iterations_to_tol(P, TOL)
        for cand in accuracy_candidates(spec["torchdeq"], spec["quick"]):
            cand = {**cand, "K": K}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                vals = _all_quantities(cand, P)
            result["rows"].append({**cand, "dtype": dname,
                                   "rel_err": {q: _rel(vals[q], ref[q]) for q in vals},
                                   "warned": bool(caught)})
    return result


# --------------------------------------------------------------------------- worker: peers' higher orders


class SmallProblem(Problem):
    """A strongly contractive float64 problem (‖A‖₂ = 0.5, n = 8, 4 samples): unrolling
    200 iterations is exact to round-off, so it is an unimpeachable reference."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        n, d, B = 8, 2, 4
        A = r(n, n)
        A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
        self.regime, self.n, self.batch = "small", n, B
        self.weights = [p.requires_grad_() for p in (A, r(n, d), r(n), 0.1 * r(n))]
        self.x, self.t, self.c = r(B, d), torch.rand(B, 1, generator=g, dtype=torch.float64), r(n)
        self.target = torch.sin(3 * self.t[:, 0])
        self.g = torch.cos(3 * self.t[:, 0])
        self.v = [r(*w.shape) for w in self.weights]


def _peer_solvers(P: Problem) -> dict:
    """name -> solve(stats) closure for every peer available."""
    solvers = {"deqdiff (anderson, auto)": make_solver(
        {"method": "deqdiff", "fsolver": "anderson", "bsolver": "auto", "tol": REF_TOL}, P)}
    try:
        from torchdeq import get_deq

        for fs in FWD_SOLVERS:
            solvers[f"torchdeq ift ({TORCHDEQ_NAME[fs]})"] = make_solver(
                {"method": "torchdeq", "fsolver": fs, "tol": REF_TOL}, P)
        hook = get_deq(ift=True, hook_ift=True, f_solver="anderson", b_solver="anderson",
                       f_max_iter=500, b_max_iter=500, f_tol=REF_TOL, b_tol=REF_TOL,
                       f_stop_mode="rel", b_stop_mode="rel")
        solvers["torchdeq hook_ift (anderson)"] = lambda st: hook(lambda z: f(z, *P.params), P.z0())[0][-1]
    except ImportError as e:
        solvers["torchdeq"] = f"not importable: {e}"
    try:
        from xitorch.optimize import equilibrium

        for bck in ("exactsolve", None):
            opts = {"method": bck} if bck else {}
            solvers[f"xitorch equilibrium (bck {bck or 'default'})"] = functools.partial(
                lambda st, o: equilibrium(lambda z, *p: f(z, *p), P.z0(), params=P.params,
                                          method="broyden1", f_tol=1e-13, maxiter=500, bck_options=o),
                o=opts)
    except ImportError as e:
        solvers["xitorch"] = f"not importable: {e}"
    return solvers


def worker_peers(spec: dict) -> dict:
    P = SmallProblem()
    ref = {}
    for q in ("grad", "hvp", "pinn"):
        P.needs_time_grad(q == "pinn")
        ref[q] = _flat(QUANTITIES[q](lambda st: solve_unrolled(P, 200, st), P, {}))
    rows = []
    for name, solve in _peer_solvers(P).items():
        if isinstance(solve, str):
            rows.append({"name": name, "error": solve})
            continue
        row = {"name": name, "rel_err": {}}
        for q in ("grad", "hvp", "pinn"):
            P.needs_time_grad(q == "pinn")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row["rel_err"][q] = _rel(_flat(QUANTITIES[q](solve, P, {})), ref[q])
            except Exception as e:  # a peer failing is a result, not a crash
                row["rel_err"][q] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
    return {"problem": "n=8, B=4, ||A||_2=0.5, float64; reference: unrolled 200 iterations",
            "tol": REF_TOL, "rows": rows}


# --------------------------------------------------------------------------- worker: where the time goes


class SectionTimer:
    """Exclusive wall time of wrapped functions (nested calls are subtracted from callers)."""

    def __init__(self, device):
        self.device, self.stack = device, []
        self.excl, self.calls = defaultdict(float), defaultdict(int)
        self.patched: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        orig = getattr(owner, name, None)
        if orig is None:
            print(f"note: cannot instrument {owner}.{name} (renamed?)", file=sys.stderr)
            return
        timer = self

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            harness.sync(timer.device)
            timer.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                harness.sync(timer.device)
                el, child = time.perf_counter() - t0, timer.stack.pop()
                timer.excl[label] += el - child
                timer.calls[label] += 1
                if timer.stack:
                    timer.stack[-1] += el

        setattr(owner, name, wrapper)
        self.patched.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self.patched):
            setattr(owner, name, orig)

    def reset(self) -> None:
        self.excl.clear(), self.calls.clear()


def instrument(device) -> SectionTimer:
    # the package re-exports functions named like their modules: fetch the modules themselves
    fp_mod, ls_mod, op_mod = (importlib.import_module(f"deqdiff.engine.{m}")
                              for m in ("fixed_point", "linear_solve", "operators"))
    T = SectionTimer(device)
    T.wrap(fp_mod, "_forward_solve", "forward solve")
    T.wrap(ls_mod, "_numeric_solve", "derivative solves: iterations")
    T.wrap(op_mod.FixedPointJacobian, "_linearize", "linearize (vjp at z*)")
    T.wrap(op_mod.Linearization, "blocks", "dense blocks (vmap of N vjps)")
    T.wrap(op_mod.Linearization, "lu", "batched LU factor")
    T.wrap(ls_mod, "_param_cotangent", "operator-parameter cotangents (2nd order)")
    T.wrap(fp_mod, "check_fixed_point_inputs", "input validation")
    return T


def breakdown_one(spec: dict, P: Problem, T: SectionTimer, repeats: int) -> dict:
    step = make_step(spec, P)
    step({})  # warm
    totals, parts = [], defaultdict(list)
    for _ in range(repeats):
        T.reset()
        st: dict = {}
        dt = harness.timed(lambda: step(st), spec["device"])
        totals.append(dt)
        for k, v in T.excl.items():
            parts[k].append(v)
        parts["other (autograd glue)"].append(dt - sum(T.excl.values()))
    return {"config": f"{spec['fsolver']}/{spec['bsolver']}", "quantity": spec["quantity"],
            "total_s": statistics.median(totals),
            "parts_s": {k: statistics.median(v) for k, v in parts.items()},
            "calls": dict(T.calls), "iterations": summarize_stats(st)}


def _time_fn(fn, device, reps: int = 20) -> float:
    fn()

    def calls() -> None:
        for _ in range(reps):
            fn()

    return harness.timed(calls, device) / reps


def micro_costs(P: Problem, device) -> dict:
    """Per-call costs at z* of the pieces the derivative solves are made of."""
    with torch.no_grad():
        z = deqdiff.fixed_point(f, P.z0(), *[p.detach() for p in P.params], solver="anderson",
                                tol=TOL, max_iter=MAX_ITER, batch_ndim=1, on_fail="ignore")
    theta = [p.detach() for p in P.params]
    fz = lambda zz: f(zz, *theta)  # noqa: E731
    v = torch.randn_like(z)
    _, f_vjp = torch.func.vjp(fz, z)
    _, f_jvp = torch.func.vjp(lambda w: f_vjp(w)[0], torch.zeros_like(z))
    _, lin = torch.func.linearize(fz, z)
    A = theta[0]
    s = 1 - f(z, *theta) ** 2
    S, N = z.shape
    basis = torch.eye(N, dtype=z.dtype, device=z.device)[:, None, :].expand(N, S, N)
    rmv = lambda u: u - f_vjp(u)[0]  # noqa: E731  (I − J)ᵀu, as in the engine
    blocks = torch.func.vmap(rmv)(basis).transpose(0, 1).contiguous()
    with torch.no_grad():
        costs = {
            "f(z) eval": _time_fn(lambda: fz(z), device),
            "J^T u: stored vjp (rmv)": _time_fn(lambda: f_vjp(v), device),
            "J v: double vjp (engine mv)": _time_fn(lambda: f_jvp(v), device),
            "J v: torch.func.jvp (re-evaluates f)": _time_fn(lambda: torch.func.jvp(fz, (z,), (v,)), device),
            "J v: torch.func.linearize (stored)": _time_fn(lambda: lin(v), device),
            "J v: hand-written s*(v A^T)": _time_fn(lambda: s * (v @ A.T), device),
            "linearize: vjp + double-vjp setup": _time_fn(
                lambda: torch.func.vjp(lambda w: torch.func.vjp(fz, z)[1](w)[0], torch.zeros_like(z)), device, 5),
            "dense blocks: vmap of N vjps (engine)": _time_fn(lambda: torch.func.vmap(rmv)(basis), device, 3),
            "dense blocks: hand-written I - s[:,:,None]*A": _time_fn(
                lambda: torch.eye(N, dtype=z.dtype, device=z.device) - s[:, :, None] * A, device, 3),
            "batched LU factor (S,N,N)": _time_fn(lambda: torch.linalg.lu_factor(blocks), device, 3),
        }
        LU, piv = torch.linalg.lu_factor(blocks)
        costs["batched LU solve, 1 rhs per row"] = _time_fn(lambda: torch.linalg.lu_solve(LU, piv, v[:, :, None]), device)
    return {k: round(val * 1e3, 3) for k, val in costs.items()}  # milliseconds


def worker_breakdown(spec: dict) -> dict:
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    P = Problem(spec["regime"], spec["batch"], dtype, device)
    T = instrument(device)
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cfg in spec["configs"]:
                rows.append(breakdown_one({**spec, **cfg}, P, T, spec["repeats"]))
    finally:
        T.restore()
    P.needs_time_grad(False)
    return {"regime": spec["regime"], "rows": rows, "micro_ms": micro_costs(P, device)}


WORKERS = {"measure": worker_measure, "accuracy": worker_accuracy, "peers": worker_peers,
           "breakdown": worker_breakdown}


# --------------------------------------------------------------------------- orchestration


def run_worker(spec: dict, log, env_extra: dict | None = None) -> dict:
    """Run the worker ``WORKERS[spec["kind"]]`` in a fresh interpreter; a failure is returned as
    ``{**spec, "error": <stderr tail>}``."""
    try:
        run = harness.call_isolated(WORKERS[spec["kind"]], spec, env=env_extra)
    except harness.IsolatedRunError as e:
        err = (e.stderr.strip() or str(e))[-800:]
        log(f"  !! worker failed ({spec.get('kind')}): {err}")
        return {**spec, "error": err}
    out = run.data
    if not spec.get("memory_only"):
        log(f"  {describe(spec)}: {_brief(out)} [{run.wall_s:.1f}s]")
    return out


def measure_with_live(spec: dict, log) -> dict:
    """Time and memory in one worker; for steps of unrolled/deqdiff on CPU also the 'live'
    memory in a second worker started with LIVE_ENV."""
    out = run_worker(spec, log)
    if spec["live"] and spec["quantity"] != "fwd" and spec["method"] != "torchdeq" and "error" not in out:
        live = run_worker(dict(spec, memory_only=True), log, LIVE_ENV)
        out["live_memory"] = None if "error" in live else live
        if "error" not in live:
            log(f"    live memory: +{live['peak_mib']:.0f} MiB")
    return out


def describe(spec: dict) -> str:
    if spec["kind"] != "measure":
        return f"{spec['kind']} {spec.get('regime', '')}"
    return f"{spec['regime']} {label(spec)} {spec['quantity']}"


def _brief(out: dict) -> str:
    if "median_s" in out:
        it = out["iterations"].get("forward", {})
        return f"median {out['median_s']:.3f}s, +{out['memory']['peak_mib']:.0f} MiB, fwd it {it.get('max')}"
    return "done"


def label(r: dict) -> str:
    if r["method"] == "unrolled":
        return "unrolled"
    if r["method"] == "torchdeq":
        return f"torchdeq {r['fsolver']}"
    return f"deqdiff {r['fsolver']}/{r['bsolver']}"


def resolved_auto(n: int) -> str:
    """What "auto" runs here: the samples are ``row_params`` (x, t), so always Richardson on
    running samples with a dense tail (n ≤ 256) or GMRES fallback."""
    ls_mod = importlib.import_module("deqdiff.engine.linear_solve")
    tail = "dense tail" if n <= ls_mod.DENSE_TAIL_MAX_ROW_SIZE else "GMRES fallback"
    return f"{ls_mod.ITERATIVE_AUTO} (Richardson ≤ n iterations per sample, {tail})"


def torchdeq_available() -> bool:
    try:
        import torchdeq  # noqa: F401
        return True
    except ImportError:
        return False


def plan_regime(regime: str, args, K: int, measure) -> list[dict]:
    """Run the time/memory measurements of one regime; later ones depend on earlier ones
    (the faster forward solver is the one paired with the alternative backward solvers)."""
    base = dict(kind="measure", regime=regime, dtype=args.dtype, device=args.device,
                live=not args.quick and torch.device(args.device).type == "cpu",
                batch=args.batch[regime], repeats=args.repeats, budget_s=args.budget)
    alts = list(ALT_BACKWARD)
    tdq = args.torchdeq
    unrolled = dict(base, method="unrolled", K=K)
    deq = lambda fs, bs="auto": dict(base, method="deqdiff", fsolver=fs, bsolver=bs)  # noqa: E731
    tq = lambda fs: dict(base, method="torchdeq", fsolver=fs)  # noqa: E731
    if args.quick:
        specs = [dict(unrolled, quantity=q) for q in ("fwd", "pinn")]
        specs += [dict(deq("fixed_point"), quantity=q) for q in ("fwd", "grad", "pinn")]
        specs += [dict(tq("fixed_point"), quantity="grad")] if tdq else []
        return [measure(s) for s in specs]
    results = [measure(dict(unrolled, quantity="fwd"))]
    results += [measure(dict(deq(fs), quantity="fwd")) for fs in FWD_SOLVERS]
    results += [measure(dict(tq("fixed_point"), quantity="fwd"))] if tdq else []
    fwd_time = {r["fsolver"]: r.get("median_s", math.inf) for r in results if r["method"] == "deqdiff"}
    best = min(fwd_time, key=fwd_time.get)
    for q in ("grad", "hvp", "pinn"):
        results.append(measure(dict(unrolled, quantity=q)))
        results += [measure(dict(deq(fs), quantity=q)) for fs in (FWD_SOLVERS if q != "hvp" else (best,))]
    results += [measure(dict(deq(best, bs), quantity=q)) for q in ("grad", "pinn") for bs in alts]
    results += [measure(dict(tq(fs), quantity="grad")) for fs in FWD_SOLVERS] if tdq else []
    return results


def run_regime(regime: str, args, log) -> dict:
    P = Problem(regime, args.batch[regime], DTYPES[args.dtype], args.device)
    K = iterations_to_tol(P, TOL)
    del P
    log(f"[{regime}] n={REGIMES[regime]['n']} B={args.batch[regime]} {args.dtype}: K={K} plain iterations to tol {TOL:g}")
    out = {"regime": regime, "config": {**REGIMES[regime], "batch": args.batch[regime]}, "K": K,
           "auto_backward": resolved_auto(REGIMES[regime]["n"])}
    out["measurements"] = plan_regime(regime, args, K, lambda s: measure_with_live(s, log))
    if not args.skip_accuracy:
        out["accuracy"] = run_worker(dict(kind="accuracy", regime=regime, batch=args.acc_batch,
                                          dtype=args.dtype, device=args.device, torchdeq=args.torchdeq,
                                          quick=args.quick), log)
    if not args.skip_breakdown and not args.quick:
        best = best_config(out["measurements"], "pinn")
        fs = best["fsolver"] if best else "fixed_point"
        cfgs = [dict(fsolver=fs, bsolver="auto", quantity=q) for q in ("grad", "pinn")]
        cfgs += [dict(fsolver=fs, bsolver=b, quantity="pinn") for b in ("dense", "richardson", "gmres") if b != out["auto_backward"]]
        out["breakdown"] = run_worker(dict(kind="breakdown", regime=regime, batch=args.batch[regime],
                                           dtype=args.dtype, device=args.device, repeats=2,
                                           method="deqdiff", configs=cfgs), log)
    return out


# --------------------------------------------------------------------------- tables


def _lookup(ms: list[dict], **kw) -> dict | None:
    for m in ms:
        if "median_s" in m and all(m.get(k) == v for k, v in kw.items()):
            return m
    return None


def best_config(ms: list[dict], quantity: str) -> dict | None:
    cands = [m for m in ms if m.get("method") == "deqdiff" and m.get("quantity") == quantity and "median_s" in m]
    return min(cands, key=lambda m: m["median_s"]) if cands else None


def _fwd_of(ms, m) -> dict | None:
    kw = {"method": m["method"], "quantity": "fwd"}
    if m["method"] != "unrolled":
        kw["fsolver"] = m["fsolver"]
    return _lookup(ms, **kw)


def _iter_text(m: dict) -> str:
    it = m.get("iterations", {})
    fwd = it.get("forward", {})
    der = it.get("derivative", [])
    s = f"{fwd.get('max', '?')}/{fwd.get('mean', '?')}"
    if der:
        s += " ; " + ",".join(str(d.get("max", "?")) for d in der)
    return s


def _mem_text(m: dict) -> str:
    live = m.get("live_memory")
    return f"{m['memory']['peak_mib']:.0f}" + (f"/{live['peak_mib']:.0f}" if live else "")


def table_main(res: dict) -> str:
    ms = res["measurements"]
    columns = ["method (fwd/bwd solver)", "fwd solve s", "(a) grad s (×fwd, +MiB rss/live)",
               "(b) HVP s (×fwd, +MiB rss/live)", "(c) PINN s (×fwd, +MiB rss/live)",
               "iterations fwd max/mean ; derivative solves max"]
    rows = []
    configs = []
    for m in ms:
        if m.get("method") and "median_s" in m:
            key = (m["method"], m.get("fsolver"), m.get("bsolver"))
            if key not in configs:
                configs.append(key)
    for method, fs, bs in configs:
        kw = {"method": method, **({"fsolver": fs} if fs else {}), **({"bsolver": bs} if bs else {})}
        fwd = _lookup(ms, method=method, quantity="fwd", **({"fsolver": fs} if fs else {}))
        cells = [f"{fwd['median_s']:.3f}" if fwd else "–"]
        its = []
        for q in ("grad", "hvp", "pinn"):
            m = _lookup(ms, quantity=q, **kw)
            if m is None:
                cells.append("–")
                continue
            ratio = f"{m['median_s'] / fwd['median_s']:.1f}×" if fwd else "–"
            cells.append(f"{m['median_s']:.3f} ({ratio}, {_mem_text(m)})")
            its.append(f"{q}: {_iter_text(m)}")
        name = label(kw | {"method": method})
        if bs == "auto":
            name += f" (→{res['auto_backward']})"
        its = its or ([f"fwd: {_iter_text(fwd)}"] if fwd else [])
        rows.append([name, *cells, "<br>".join(its)])
    return harness.markdown_table(columns, rows)


def table_targets(res: dict) -> str:
    ms = res["measurements"]
    un = _lookup(ms, method="unrolled", quantity="pinn")
    best = best_config(ms, "pinn")
    default = _lookup(ms, method="deqdiff", fsolver="anderson", bsolver="auto", quantity="pinn")
    need_speed = 3.0 if res["regime"] == "narrow" else 2.0
    deqs = [m for m in ms if m.get("method") == "deqdiff" and m.get("quantity") == "pinn" and "median_s" in m]
    leanest = min(deqs, key=lambda m: (m.get("live_memory") or m["memory"])["peak_mib"]) if deqs else None
    rows = []
    seen = []
    for m in (best, default, leanest):
        if m is None or un is None or any(m is x for x in seen):
            continue
        seen.append(m)
        cfg = label(m)
        spd = un["median_s"] / m["median_s"]
        for kind, get in (("rss", lambda r: r["memory"]), ("live", lambda r: r.get("live_memory"))):
            if not get(un) or not get(m):
                continue
            a, b = get(un)["peak_mib"], get(m)["peak_mib"]
            mem = a / max(b, 1e-9)
            rows.append([f"(c) peak memory ({kind}), unrolled ÷ deqdiff", cfg, f"{a:.0f} / {b:.1f} MiB = {mem:.1f}×",
                         "≥ 20×", "yes" if mem >= 20 else "NO"])
        rows.append(["(c) speed, unrolled ÷ deqdiff", cfg, f"{un['median_s']:.3f} / {m['median_s']:.3f} s = {spd:.2f}×",
                     f"≥ {need_speed:g}×", "yes" if spd >= need_speed else "NO"])
        fwd = _fwd_of(ms, m)
        if fwd:
            rows.append(["(c) step ÷ own forward solve", cfg, f"{m['median_s'] / fwd['median_s']:.2f}× "
                         f"(unrolled: {un['median_s'] / _fwd_of(ms, un)['median_s']:.2f}×)", "report", "–"])
    g_best = best_config(ms, "grad")
    for fs in FWD_SOLVERS:
        tq = _lookup(ms, method="torchdeq", fsolver=fs, quantity="grad")
        if tq and g_best:
            r = tq["median_s"] / g_best["median_s"]
            rows.append([f"(a) grad, torchdeq {fs} ÷ deqdiff best", label(g_best),
                         f"{tq['median_s']:.3f} / {g_best['median_s']:.3f} s = {r:.2f}×", "≥ 1×", "yes" if r >= 1 else "NO"])
        same = _lookup(ms, method="deqdiff", fsolver=fs, bsolver="auto", quantity="grad")
        if tq and same:
            r = tq["median_s"] / same["median_s"]
            rows.append([f"(a) grad, torchdeq {fs} ÷ deqdiff same forward", label(same),
                         f"{tq['median_s']:.3f} / {same['median_s']:.3f} s = {r:.2f}×", "≥ 1×", "yes" if r >= 1 else "NO"])
    acc = res.get("accuracy", {})
    if "rows" in acc:
        f64 = [r for r in acc["rows"] if r["dtype"] == "float64"]
        row_u = next(r for r in f64 if r["method"] == "unrolled")
        for r in f64:
            if r["method"] != "deqdiff" or r["bsolver"] != "auto":
                continue
            for q in ("grad", "pinn"):
                w, u = r["rel_err"][q], row_u["rel_err"][q]
                rows.append([f"({'a' if q == 'grad' else 'c'}) rel. error vs reference, float64", label(r),
                             f"{w:.1e} (unrolled {u:.1e}; ratio {w / u:.2f})", "≤ unrolled's", "yes" if w <= u else "NO"])
    return harness.markdown_table(["target", "deqdiff config", "measured", "target", "met?"], rows)


def table_accuracy(acc: dict) -> str:
    if "rows" not in acc:
        return f"accuracy run failed: {acc.get('error', '?')}"
    head = (f"Reference: {acc['reference']}; it agrees with unrolled-to-1e-12 (K={acc['K_ref']}) to "
            + ", ".join(f"{q} {v:.1e}" for q, v in acc["reference_vs_unrolled_1e-12"].items())
            + f". Batch {acc['batch']}.\n\n")
    rows = [[label(r) + (f" (K={r['K']})" if r["method"] == "unrolled" else ""), r["dtype"],
             *(f"{r['rel_err'][q]:.1e}" for q in ("grad", "hvp", "pinn"))] for r in acc["rows"]]
    return head + harness.markdown_table(["method", "dtype", "(a) grad rel err", "(b) HVP rel err", "(c) PINN rel err"],
                                         rows)


def table_peers(peers: dict) -> str:
    fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else v  # noqa: E731
    rows = [[r["name"], r["error"], "", ""] if "error" in r else
            [r["name"], *(fmt(r["rel_err"][q]) for q in ("grad", "hvp", "pinn"))] for r in peers.get("rows", [])]
    return (f"Problem: {peers.get('problem')}; every solver at tol {peers.get('tol')}.\n\n"
            + harness.markdown_table(["implementation", "(a) grad rel err", "(b) HVP rel err", "(c) PINN rel err"], rows))


def table_breakdown(bd: dict) -> str:
    if "rows" not in bd:
        return f"breakdown failed: {bd.get('error', '?')}"
    order = ["input validation", "forward solve", "linearize (vjp at z*)", "dense blocks (vmap of N vjps)",
             "batched LU factor", "derivative solves: iterations", "operator-parameter cotangents (2nd order)",
             "other (autograd glue)"]
    present = {k for r in bd["rows"] for k in r["parts_s"]}
    labels = [k for k in order if k in present] + sorted(present - set(order))
    rows = [[r["config"], r["quantity"], f"{r['total_s']:.3f}",
             *(f"{r['parts_s'][k]:.3f} ({r['calls'].get(k, '')})" if k in r["parts_s"] else "–" for k in labels)]
            for r in bd["rows"]]
    micro = [[k, f"{v:.3f}"] for k, v in bd["micro_ms"].items()]
    return (harness.markdown_table(["config", "quantity", "total s", *labels], rows) + "\n\n"
            + harness.markdown_table(["operation at z*", "ms per call"], micro))


def render(all_res: dict) -> str:
    meta = all_res["meta"]
    out = [f"Command: `{meta['command']}`  \nDate: {meta['date']}; {meta['machine']}; torch {meta['torch']}; "
           f"timing dtype {meta['dtype']} on {meta['device']}, {meta['threads']} threads; "
           f"medians of {meta['repeats']} repeats (fewer when a measurement exceeds {meta['budget_s']}s)."]
    for regime, res in all_res["regimes"].items():
        cfg = res["config"]
        out.append(f"\n## {regime}: n={cfg['n']}, B={cfg['batch']}, A = {cfg['rho']}·{cfg['kind']}; "
                   f"unrolled K={res['K']}; auto backward → {res['auto_backward']}\n")
        out.append("### Time (median s), step ÷ own forward solve, extra peak memory (MiB)\n")
        out.append(table_main(res))
        out.append("\n### Targets\n")
        out.append(table_targets(res))
        if "accuracy" in res:
            out.append("\n### Accuracy against a tight reference\n")
            out.append(table_accuracy(res["accuracy"]))
        if "breakdown" in res:
            out.append("\n### Where the deqdiff step's time goes (exclusive seconds, (calls))\n")
            out.append(table_breakdown(res["breakdown"]))
    if "peers" in all_res:
        out.append("\n## Peers: are higher derivatives right?\n")
        out.append(table_peers(all_res["peers"]))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: smaller batches, fewer configs (< 1 min)")
    p.add_argument("--regimes", default="hard,narrow")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the timed runs")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--budget", type=float, default=12.0, help="stop repeating after this many seconds (min 3)")
    p.add_argument("--acc-batch", type=int, default=200, help="batch of the float64 accuracy check")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-breakdown", action="store_true")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.acc_batch = min(args.repeats, 2), min(args.acc_batch, 50)
    args.batch = {r: (QUICK_BATCH[r] if args.quick else REGIMES[r]["batch"]) for r in REGIMES}
    args.torchdeq = torchdeq_available()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not args.torchdeq:
        log("torchdeq is not importable: its rows are skipped (pip install --no-deps torchdeq)")
    meta = {"command": " ".join(["PYTHONPATH=src python", "benchmarks/bench_core.py", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(), **harness.machine_info("torch", "threads", machine="summary"),
            "dtype": args.dtype, "device": args.device, "repeats": args.repeats, "budget_s": args.budget,
            "quick": args.quick, "tol": TOL}
    all_res = {"meta": meta, "regimes": {}}
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    for regime in args.regimes.split(","):
        res = run_regime(regime, args, log)
        all_res["regimes"][regime] = res
        harness.write_json(out_dir / f"core_{regime}{suffix}.json", {"meta": meta, **res})
    if not args.skip_peers:
        all_res["peers"] = run_worker({"kind": "peers"}, log)
        harness.write_json(out_dir / f"core_peers{suffix}.json", {"meta": meta, **all_res["peers"]})
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    text = render(all_res)
    (out_dir / f"core_tables{suffix}.md").write_text(text)
    print(text)
    log(f"total wall time {meta['wall_s']}s; JSON and tables in {out_dir}")


if __name__ == "__main__":
    main()
