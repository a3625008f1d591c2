"""One physics-informed training step of the PIDEQ setup: deqdiff vs. unrolled autodiff vs. an
MLP PINN vs. JAX optimistix; can torchdeq / xitorch produce the second derivative at all?

Run from the repository root (one thread per process: on a busy 2-core machine two torch
threads per process made every step 10–50× slower through oversubscription)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_pinn.py          # full run (~9–12 min)
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_pinn.py --quick  # smoke run (~1 min)
    PYTHONPATH=src python benchmarks/bench_pinn.py --device cuda              # GPU, 10⁵ points
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_pinn.py --pde-train-epochs 1500
        # Burgers: equal-epoch training of the DEQ (implicit, unrolled) and MLPs (~4 min);
        # writes results/pinn_burgers_train.json, which the tables include (--render-only)

Results: ``benchmarks/results/pinn.json`` (``pinn_quick.json``, ``pinn_cuda.json``) and the
markdown section ``benchmarks/results/pinn.md`` (written after every section, so an
interrupted run keeps what it measured; ``--merge`` adds sections to an earlier run).

Step (Pacheco 2022): Van der Pol (μ = 1, y(0) = (0, 0.1), t ∈ [0, 2]), model
``y = C z* + c + D t``, ``z* = tanh(A z* + U t + b)`` with 80 states (``deqdiff.physics.PIDEQ``),
loss ``mean‖y(0) − y0‖² + 0.1·mean‖dy/dt − F(y)‖² + κ·mean‖∂f/∂z‖_F`` (κ = 1) at ``--points``
collocation points, and its gradient w.r.t. every weight. ``dy/dt`` needs the derivative of z*
w.r.t. t kept in the graph, so the weight gradient is a second derivative of z*. Methods:

* ``deqdiff``: ``PIDEQ(mode="implicit")`` + ``PhysicsLoss`` — the library default: Anderson
  forward solve at tol 1e-4, ``dy/dt`` by forward mode (one implicit tangent solve for both
  outputs, kept in the graph), backward ``auto`` (Richardson on running samples, at most 80
  iterations each, the rest by a dense LU of those samples);
* ``deqdiff-rev``: the same with ``dy/dt`` by reverse mode (``autograd.grad(...,
  create_graph=True)``, one adjoint solve per output);
* ``-fp`` variants use plain fixed-point iteration forward, ``-richardson`` / ``-dense`` that
  backward (derivative) solver;
* ``unrolled-anderson`` (PIDEQ's approach: the same Anderson solve) and ``unrolled`` (plain
  iteration): ``PIDEQ(mode="unrolled")`` — the solver loop recorded by autograd until the same
  stopping rule holds, so every derivative backpropagates through all forward iterations;
* ``mlp``: explicit tanh MLP PINNs, 4×20 (the PIDEQ paper's baseline) and 4×46 (parameter
  count comparable to the 80-state PIDEQ), same loss without the Jacobian term;
* ``jax``: JAX + optimistix, ``optx.fixed_point(FixedPointIteration, adjoint=ImplicitAdjoint())``
  vmapped over samples, ``dy/dt`` by ``jax.jvp``, ``jax.grad`` of the loss, all under
  ``jax.jit`` (compile time excluded).

Regimes: ``init`` (PIDEQ's initialization: Gaussian A, ‖A‖₂ = 0.5, ~7 iterations at tol 1e-4)
and ``hard`` (A = 0.95·orthogonal: spectrum on a circle, ~40 iterations). A third section times
the Burgers step of ``deqdiff pinn burgers`` (third order: the loss holds u_xx), implicit vs
unrolled vs MLP PINNs.

Measurement (``benchmarks/harness.py``, as in bench_core.py): each (regime, method, quantity)
runs in a fresh subprocess: warm-up step on a tiny problem, then the extra peak RSS of one
step (``VmHWM`` difference, high-water mark reset first; CUDA:
``max_memory_allocated``), then ``--repeats`` timed steps (median). ``fwd`` is the forward
solve alone at the collocation points (no graph). Accuracy: float64 gradients at tol 1e-4
against a tight float64 reference (deqdiff at tol 1e-12, dense backward; cross-checked with
unrolled iteration to 1e-12). Peers: on a small contractive float64 problem, the same PINN
gradient from torchdeq and xitorch against unrolled autodiff (exact there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import deqdiff
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    import deqdiff

import harness  # noqa: E402  (benchmarks/harness.py: timing, peak memory, fresh processes)
from deqdiff.physics import MLP, PIDEQ, PhysicsLoss  # noqa: E402
from deqdiff.physics.problems import van_der_pol  # noqa: E402

TOL, REF_TOL = 1e-4, 1e-12
WIDTH, LAM, KAPPA, MU, T_END, Y0 = 80, 0.1, 1.0, 1.0, 2.0, (0.0, 0.1)
MAX_ITER = 500
#: ‖A‖₂ and the kind of A: PIDEQ's initialization (Gaussian, spectral radius ≈ ‖A‖₂/2: fast
#: contraction), and a stress regime with the spectrum on a circle of radius 0.95 (slow)
REGIMES = {"init": (0.5, "gaussian"), "hard": (0.95, "orthogonal")}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METHODS = {
    "deqdiff": dict(kind="pideq", mode="implicit", backward="auto"),
    "deqdiff-dense": dict(kind="pideq", mode="implicit", backward="dense"),
    "deqdiff-rev": dict(kind="pideq", mode="implicit", backward="auto", derivative_mode="reverse"),
    "deqdiff-fp": dict(kind="pideq", mode="implicit", forward="fixed_point", backward="auto"),
    "deqdiff-fp-richardson": dict(kind="pideq", mode="implicit", forward="fixed_point", backward="richardson"),
    "unrolled": dict(kind="pideq", mode="unrolled", unrolled_solver="fixed_point"),
    "unrolled-anderson": dict(kind="pideq", mode="unrolled", unrolled_solver="anderson"),
    "mlp-4x20": dict(kind="mlp", width=20),
    "mlp-4x46": dict(kind="mlp", width=46),
    "jax": dict(kind="jax"),
}


FULL_METHODS = ["deqdiff", "deqdiff-dense", "deqdiff-rev", "deqdiff-fp", "deqdiff-fp-richardson",
                "unrolled", "unrolled-anderson", "mlp-4x20", "mlp-4x46"]
#: the stress regime only needs the methods whose cost depends on the iteration count
HARD_METHODS = ["deqdiff", "deqdiff-dense", "deqdiff-rev", "deqdiff-fp", "deqdiff-fp-richardson", "unrolled",
                "unrolled-anderson", "mlp-4x46"]
QUICK_METHODS = ["deqdiff", "unrolled", "mlp-4x46"]
#: methods whose forward solve is another's (same model, same forward solver)
SHARED_FWD = {"deqdiff-dense": "deqdiff", "deqdiff-rev": "deqdiff", "deqdiff-fp-richardson": "deqdiff-fp"}


# --------------------------------------------------------------------------- problem


def build_model(method: str, regime: str, dtype, device, tol: float = TOL, seed: int = 0):
    """The model of ``method`` with weights drawn from ``seed`` (identical across methods that
    share an architecture: every PIDEQ variant and the JAX twin see the same numbers)."""
    spec = METHODS[method]
    torch.manual_seed(seed)
    if spec["kind"] == "mlp":
        return MLP(1, 2, spec["width"], 4).to(device=device, dtype=dtype)
    rho, kind = REGIMES[regime]
    opts = dict(mode=spec["mode"], solver=spec.get("forward", "anderson"), tol=tol, max_iter=MAX_ITER, rho=rho)
    if spec["mode"] == "implicit":
        opts["backward_solver"] = spec.get("backward", "auto")
    else:
        opts["unrolled_solver"] = spec["unrolled_solver"]
    model = PIDEQ(1, 2, WIDTH, **opts)
    with torch.no_grad():  # a non-trivial skip and head, as after some training
        g = torch.Generator().manual_seed(seed + 1)
        model.D.weight.copy_(0.3 * torch.randn(model.D.weight.shape, generator=g))
        model.cell.b.copy_(0.3 * torch.randn(model.cell.b.shape, generator=g))
        if kind == "orthogonal":
            q = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64))[0]
            model.cell.A.copy_(rho * q)
    return model.to(device=device, dtype=dtype)


def collocation(batch: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 2)
    t = T_END * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    ic = (torch.zeros(1, 1, dtype=torch.float64), torch.tensor([Y0], dtype=torch.float64))
    cast = lambda u: u.to(dtype=dtype, device=device)  # noqa: E731
    return cast(t), (cast(ic[0]), cast(ic[1]))


def physics_loss(kappa: float = KAPPA, derivative_mode: str = "forward") -> PhysicsLoss:
    return PhysicsLoss(lambda t, y: van_der_pol(t, y, MU), physics_weight=LAM, ic_weight=1.0, jacobian_weight=kappa,
                       derivative_mode=derivative_mode)


def _cell(z, A, U, b, t):
    """The PIDEQ layer as a plain function (the peers section's twin of ``TanhCell``)."""
    return torch.tanh(torch.addmm(torch.addmm(b, t, U.T), z, A.T))


def make_step(method: str, quantity: str, regime: str, batch: int, dtype, device, tol: float = TOL):
    """``step(stats) -> list of tensors``: the weight gradient (``step``) or the forward
    solve alone at the collocation points (``fwd``)."""
    model = build_model(method, regime, dtype, device, tol)
    t, ic = collocation(batch, dtype, device)
    params = list(model.parameters())
    kind = METHODS[method]["kind"]
    if quantity == "fwd":
        def fwd(st):
            for p in params:  # no graph at all (the unrolled loop enables grad itself)
                p.requires_grad_(False)
            try:
                with torch.no_grad():
                    y = model(t)
            finally:
                for p in params:
                    p.requires_grad_(True)
            st["iterations"] = getattr(model, "last_iterations", None)
            return [y]
        return fwd
    loss_fn = physics_loss(KAPPA if kind != "mlp" else 0.0, METHODS[method].get("derivative_mode", "forward"))

    def step(st):
        terms = loss_fn(model, t, ic=ic)
        if "iters_max" in terms.terms:  # the collocation points' solve (not the IC point's)
            st["iterations"] = {"max": int(terms.terms["iters_max"]), "mean": round(terms.terms["iters_mean"], 1)}
        return list(torch.autograd.grad(terms.total, params))
    return step


# --------------------------------------------------------------------------- PDE: Burgers (third order)

PDE_METHODS = {"burgers-implicit": dict(model="deq", mode="implicit"),
               "burgers-unrolled": dict(model="deq", mode="unrolled"),
               "burgers-mlp-4x20": dict(model="mlp", mlp_width=20),
               "burgers-mlp-4x28": dict(model="mlp", mlp_width=28)}


def make_pde_step(method: str, quantity: str, batch: int, dtype, device, tol: float | None = None):
    """One training step of ``deqdiff pinn burgers`` (defaults: 24 states, ν = 0.1/π): the
    residual needs u_t, u_x, u_xx, so the weight gradient is a third derivative of z*."""
    from deqdiff.physics import burgers as bg

    dname = "float64" if dtype == torch.float64 else "float32"
    cfg = bg.PDEConfig(n_collocation=batch, device=device, dtype=dname, **PDE_METHODS[method],
                       **({"tol": tol} if tol else {}))
    model, _, _, g = bg.build(cfg)
    pts = bg.sample_points(cfg, g, dtype, device)
    params = list(model.parameters())
    if quantity == "fwd":
        def fwd(st):
            with torch.no_grad():
                out = model(pts["x_col"], pts["t_col"])
            st["iterations"] = _pde_iters(model)
            return [out]
        return fwd

    def step(st):
        loss, _ = bg.pde_loss(model, cfg, pts)
        st["iterations"] = _pde_iters(model)
        return list(torch.autograd.grad(loss, params))
    return step


def _pde_iters(model):
    info = getattr(model, "last_info", None)
    if info is not None:
        return info.forward.iterations
    it = getattr(model, "last_iterations", None)
    return None if it is None else {"max": it, "mean": it}


# --------------------------------------------------------------------------- JAX optimistix twin


def _jax_setup(regime: str, batch: int, x64: bool, tol: float, seed: int = 0):
    """The JAX twin of the PIDEQ step with the torch model's weights; returns
    ``(grad_fn, params, t, names)`` where ``grad_fn`` is jitted."""
    if torch.get_num_threads() == 1 and "XLA_FLAGS" not in os.environ:
        # same single thread as the torch runs (XLA's CPU backend otherwise uses every core)
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax

    jax.config.update("jax_enable_x64", x64)
    jax.config.update("jax_platforms", "cpu") if os.environ.get("BENCH_JAX_CPU") else None
    import jax.numpy as jnp
    import optimistix as optx

    dt = torch.float64 if x64 else torch.float32
    m = build_model("deqdiff", regime, dt, "cpu", tol, seed)
    t, ic = collocation(batch, dt, "cpu")
    P = {"A": m.cell.A, "U": m.cell.U, "b": m.cell.b, "C": m.C.weight, "c": m.C.bias, "D": m.D.weight}
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in P.items()}
    tj = jnp.asarray(t.numpy())
    with torch.no_grad():  # optimistix's rule is elementwise: atol = tol·(typical ‖z*‖), two-norm
        znorm = float(m.equilibrium(t).norm(dim=1).mean())
    solver = optx.FixedPointIteration(rtol=0.0, atol=tol * znorm, norm=optx.two_norm)
    y0 = jnp.asarray(Y0, dtype=tj.dtype)

    def cell(z, args):
        A, U, b, ti = args
        return jnp.tanh(A @ z + U @ ti + b)

    def model(p, ti):
        sol = optx.fixed_point(cell, solver, jnp.zeros(WIDTH, tj.dtype), args=(p["A"], p["U"], p["b"], ti),
                               max_steps=MAX_ITER, adjoint=optx.ImplicitAdjoint(), throw=False)
        z = sol.value
        return p["C"] @ z + p["c"] + p["D"] @ ti, z

    def per_sample(p, ti):
        (y, z), (dy, _) = jax.jvp(lambda s: model(p, s), (ti,), (jnp.ones_like(ti),))
        return y, dy, z

    def loss(p, tt):
        y, dy, z = jax.vmap(per_sample, (None, 0))(p, tt)
        F = jnp.stack([y[:, 1], MU * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)
        phys = jnp.mean((dy - F) ** 2)
        ic_err = jnp.mean((model(p, jnp.zeros(1, tj.dtype))[0] - y0) ** 2)
        jac = jnp.mean(jnp.sqrt(jnp.sum((1 - z * z) ** 2 * jnp.sum(p["A"] ** 2, 1), 1)))
        return ic_err + LAM * phys + KAPPA * jac

    grad_fn = jax.jit(jax.grad(loss))
    fwd_fn = jax.jit(lambda p, tt: jax.vmap(lambda s: model(p, s)[0])(tt))
    return grad_fn, fwd_fn, params, tj, list(P)


def jax_step(regime: str, quantity: str, batch: int, x64: bool = False, tol: float = TOL):
    import jax

    grad_fn, fwd_fn, params, tj, names = _jax_setup(regime, batch, x64, tol)
    fn = grad_fn if quantity == "step" else fwd_fn

    def step(st):
        out = jax.block_until_ready(fn(params, tj))
        return out
    step({})  # compile (excluded from time and memory, like the warm-up of the torch runs)
    return step, (grad_fn, params, tj, names)


# --------------------------------------------------------------------------- workers


def _summ(it) -> dict | None:
    if it is None or isinstance(it, dict):
        return it
    it = it.detach().float()
    return {"max": int(it.max()), "mean": round(float(it.mean()), 1)}


def worker_measure(spec: dict) -> dict:
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    method, q, regime = spec["method"], spec["quantity"], spec["regime"]
    if method == "jax":
        jax_step(regime, q, 8)  # warm-up on a tiny problem: lazy imports
        step, _ = jax_step(regime, q, spec["batch"])
        device = "cpu"
    elif method in PDE_METHODS:
        make_pde_step(method, q, 8, dtype, device)({})
        step = make_pde_step(method, q, spec["batch"], dtype, device)
    else:
        make_step(method, q, regime, 8, dtype, device)({})  # warm-up: kernels, lazy imports (sympy)
        step = make_step(method, q, regime, spec["batch"], dtype, device)
    m = harness.measure_step(step, spec["repeats"], device=device, budget_s=spec["budget_s"],
                             memory_only=spec.get("memory_only", False))
    mem = m["memory"]
    if spec.get("memory_only"):
        return {"peak_mib": mem["peak_mib"], "step_s": mem["first_step_s"],
                "method": f"{mem['method']} under {harness.LIVE_RSS_ENV}"}
    return {**spec, "times_s": m["times_s"], "median_s": m["median_s"], "memory": mem,
            "iterations": _summ(m["stats"].get("iterations")), "loadavg_1min_after": os.getloadavg()[0],
            "warnings": sorted({w[:160] for w in m["warnings"]})}


def _flat(grads) -> torch.Tensor:
    return torch.cat([torch.as_tensor(g).detach().reshape(-1).to(torch.float64).cpu() for g in grads])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def worker_accuracy(spec: dict) -> dict:
    """float64 gradients at tol 1e-4 vs a tight reference (tol 1e-12, dense backward)."""
    regime, batch = spec["regime"], spec["batch"]
    f64 = torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _flat(make_step("deqdiff-dense", "step", regime, batch, f64, "cpu", REF_TOL)({}))
        ref_unr = _flat(make_step("unrolled", "step", regime, batch, f64, "cpu", REF_TOL)({}))
        rows = []
        for m in spec["methods"]:
            st: dict = {}
            try:
                g = _flat(make_step(m, "step", regime, batch, f64, "cpu", TOL)(st))
                rows.append({"method": m, "rel_err": _rel(g, ref), "iterations": _summ(st.get("iterations"))})
            except Exception as e:  # a failing baseline is a result
                rows.append({"method": m, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return {"regime": regime, "batch": batch, "reference": "deqdiff tol 1e-12, dense backward, float64",
            "reference_vs_unrolled_1e-12": _rel(ref_unr, ref), "rows": rows, "ref": ref.tolist()}


def worker_pde_accuracy(spec: dict) -> dict:
    """Burgers step in float64 at tol 1e-5 (the CLI default) vs tol 1e-12 implicit (reference),
    cross-checked with unrolled iteration to 1e-12."""
    f64, batch = torch.float64, spec["batch"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _flat(make_pde_step("burgers-implicit", "step", batch, f64, "cpu", REF_TOL)({}))
        ref_unr = _flat(make_pde_step("burgers-unrolled", "step", batch, f64, "cpu", REF_TOL)({}))
        rows = []
        for m in ("burgers-implicit", "burgers-unrolled"):
            st: dict = {}
            g = _flat(make_pde_step(m, "step", batch, f64, "cpu")(st))
            rows.append({"method": m, "rel_err": _rel(g, ref), "iterations": _summ(st.get("iterations"))})
    return {"regime": "burgers", "batch": batch, "reference": "implicit, tol 1e-12, float64",
            "reference_vs_unrolled_1e-12": _rel(ref_unr, ref), "rows": rows}


def worker_pde_train(spec: dict) -> dict:
    """``deqdiff pinn burgers`` training with equal epochs for the DEQ (implicit / unrolled) and
    the MLP PINNs: final relative L2 error against Cole–Hopf, seconds per epoch, parameters."""
    from deqdiff.physics import burgers as bg

    cfg = bg.PDEConfig(epochs=spec["epochs"], **PDE_METHODS[spec["method"]])
    t0 = time.perf_counter()
    model, hist, _ = bg.train(cfg)
    wall = time.perf_counter() - t0
    ev = bg.evaluate(model, cfg)
    return {**spec, "rel_l2": ev["rel_l2"], "max_abs": ev["max_abs"], "s_per_epoch": wall / max(cfg.epochs, 1),
            "wall_s": wall, "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": hist["loss"][-1], "fwd_iters_last": hist["fwd_iters"][-1]}


def worker_jax_accuracy(spec: dict) -> dict:
    """The JAX gradient in float64 at tol 1e-4 (same weights) vs the torch reference."""
    _, (grad_fn, params, tj, names) = jax_step(spec["regime"], "step", spec["batch"], x64=True)
    g = grad_fn(params, tj)
    flat = _flat([torch.from_numpy(__import__("numpy").asarray(g[k])) for k in names])
    ref = torch.tensor(json.loads(Path(spec["ref_path"]).read_text()), dtype=torch.float64)
    return {"method": "jax", "rel_err": _rel(flat, ref)}


def worker_peers(spec: dict) -> dict:
    """Can torchdeq / xitorch produce the PINN gradient (a second derivative of z*) at all?
    Small contractive float64 problem (n = 8, 6 points, ‖A‖₂ = 0.5): unrolled autodiff through
    200 iterations is exact there and is the reference."""
    g = torch.Generator().manual_seed(11)
    n, B = 8, 6
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    W = [A, torch.randn(n, 1, generator=g, dtype=torch.float64), 0.3 * torch.randn(n, generator=g, dtype=torch.float64)]
    W = [w.requires_grad_() for w in W]
    C = torch.randn(2, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    t = (T_END * torch.rand(B, 1, generator=g, dtype=torch.float64)).requires_grad_()

    def loss_of(solve):
        z = solve(t)
        y = z @ C.T
        dy = torch.stack([torch.autograd.grad(y[:, i].sum(), t, create_graph=True)[0][:, 0] for i in range(2)], 1)
        return ((dy - van_der_pol(t[:, 0], y, MU)) ** 2).mean() + (y ** 2).mean()

    def unrolled(tt):
        z = torch.zeros(tt.shape[0], n, dtype=torch.float64)
        for _ in range(200):
            z = _cell(z, *W, tt)
        return z

    ref = _flat(torch.autograd.grad(loss_of(unrolled), W))
    solvers = {"deqdiff (anderson, auto)": lambda tt: deqdiff.fixed_point(
        _cell, torch.zeros(tt.shape[0], n, dtype=torch.float64), *W, tt, batch_ndim=1, tol=REF_TOL)}
    try:
        from torchdeq import get_deq

        for name, kw in (("torchdeq ift (fixed_point_iter)", dict(ift=True, f_solver="fixed_point_iter", b_solver="fixed_point_iter")),
                         ("torchdeq ift (anderson)", dict(ift=True, f_solver="anderson", b_solver="anderson")),
                         ("torchdeq hook_ift (anderson)", dict(ift=True, hook_ift=True, f_solver="anderson", b_solver="anderson"))):
            deq = get_deq(f_max_iter=500, b_max_iter=500, f_tol=REF_TOL, b_tol=REF_TOL, f_stop_mode="rel",
                          b_stop_mode="rel", **kw)
            solvers[name] = (lambda d: lambda tt: d(lambda z: _cell(z, *W, tt), torch.zeros(tt.shape[0], n, dtype=torch.float64))[0][-1])(deq)
    except ImportError as e:
        solvers["torchdeq"] = f"not importable: {e}"
    try:
        from xitorch.optimize import equilibrium

        for bck in ("exactsolve", None):
            opts = {"method": bck} if bck else {}
            solvers[f"xitorch equilibrium (bck {bck or 'default'})"] = (lambda o: lambda tt: equilibrium(
                lambda z, *p: _cell(z, *p), torch.zeros(tt.shape[0], n, dtype=torch.float64), params=(*W, tt),
                method="broyden1", f_tol=1e-13, maxiter=500, bck_options=o))(opts)
    except ImportError as e:
        solvers["xitorch"] = f"not importable: {e}"
    rows = []
    for name, solve in solvers.items():
        if isinstance(solve, str):
            rows.append({"name": name, "error": solve})
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                val = _flat(torch.autograd.grad(loss_of(solve), W))
            rows.append({"name": name, "rel_err": _rel(val, ref), "warned": bool(caught)})
        except Exception as e:  # a peer failing is a result, not a crash
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return {"problem": "n=8, 6 points, ||A||_2=0.5, float64, loss mean(dy/dt - F(y))^2 + mean(y^2); "
                       "reference: unrolled autodiff through 200 iterations", "tol": REF_TOL, "rows": rows}


def worker_train(spec: dict) -> dict:
    """Equal training budget for the PIDEQ (deqdiff) and the MLP PINNs on the PIDEQ setup,
    through the Van der Pol experiment's own trainer; returns final errors and epoch times."""
    from deqdiff.physics import vdp

    cfg = vdp.VdPConfig.for_setup("pideq", model=spec["model"], width=spec["width"], epochs=spec["epochs"],
                                  batch=spec["batch"], **({"mlp_depth": 4} if spec["model"] == "mlp" else {}))
    trainer = vdp.build_trainer(cfg)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    ev = vdp.evaluate(cfg, trainer.model)
    keep = {k: v for k, v in ev.items() if isinstance(v, (int, float, str))}
    return {**spec, "wall_s": wall, "s_per_epoch": wall / max(spec["epochs"], 1), "eval": keep,
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


WORKERS = {"measure": worker_measure, "accuracy": worker_accuracy, "jax_accuracy": worker_jax_accuracy,
           "peers": worker_peers, "train": worker_train, "pde_accuracy": worker_pde_accuracy,
           "pde_train": worker_pde_train}


def run_worker(spec: dict, log, timeout: float = 300, env_extra: dict | None = None) -> dict:
    """Run the worker ``WORKERS[spec["kind"]]`` in a fresh interpreter; a failure or a timeout is
    returned as ``{**spec, "error": ...}``."""
    try:
        run = harness.call_isolated(WORKERS[spec["kind"]], spec, env=env_extra, timeout=timeout)
    except harness.IsolatedRunError as e:
        if e.returncode is None:
            log(f"  !! worker timed out after {timeout}s: {spec}")
            return {**spec, "error": f"timed out after {timeout}s"}
        err = (e.stderr.strip() or str(e))[-600:]
        log(f"  !! worker failed ({spec.get('kind')} {spec.get('method', '')}): {err}")
        return {**spec, "error": err}
    out = run.data
    brief = (f"median {out['median_s']:.3f}s, +{out['memory']['peak_mib']:.0f} MiB, it {out.get('iterations')}"
             if "median_s" in out else (f"live peak +{out['peak_mib']:.1f} MiB" if "peak_mib" in out else "done"))
    log(f"  {spec.get('kind')} {spec.get('regime', '')} {spec.get('method', spec.get('model', ''))} "
        f"{spec.get('quantity', '')}: {brief} [{run.wall_s:.1f}s]")
    return out


# --------------------------------------------------------------------------- orchestration


def jax_available() -> bool:
    try:
        import jax  # noqa: F401
        import optimistix  # noqa: F401
        return True
    except ImportError:
        return False


def run_pde(args, log) -> dict:
    base = dict(kind="measure", regime="burgers", dtype=args.dtype, device=args.device, batch=args.pde_points,
                repeats=args.repeats, budget_s=args.budget)
    ms = []
    for m in (["burgers-implicit", "burgers-unrolled"] if args.quick else PDE_METHODS):
        for q in ("fwd", "step"):
            if q == "fwd" and ("mlp" in m or args.quick):
                continue
            r = run_worker(dict(base, method=m, quantity=q), log)
            if q == "step" and "error" not in r and torch.device(args.device).type == "cpu" and not args.quick:
                live = run_worker(dict(base, method=m, quantity=q, memory_only=True), log, env_extra=harness.LIVE_RSS_ENV)
                r["live_memory"] = None if "error" in live else live
            ms.append(r)
    out = {"regime": "burgers", "points": args.pde_points, "measurements": ms}
    if not args.skip_accuracy and not args.quick:
        out["accuracy"] = run_worker(dict(kind="pde_accuracy", batch=min(args.acc_batch, 50)), log)
    return out


def run_regime(regime: str, args, log) -> dict:
    base = dict(kind="measure", regime=regime, dtype=args.dtype, device=args.device, batch=args.points,
                repeats=args.repeats, budget_s=args.budget)
    methods = args.methods.split(",") if args.methods else (
        QUICK_METHODS if args.quick else (HARD_METHODS if regime == "hard" else FULL_METHODS))
    if args.jax and args.device == "cpu" and "jax" not in methods:
        methods = [*methods, "jax"]
    if not args.jax:
        methods = [m for m in methods if m != "jax"]
    ms = []
    for m in methods:
        for q in ("fwd", "step"):
            if q == "fwd" and (m.startswith("mlp") or SHARED_FWD.get(m) in methods):
                continue
            r = run_worker(dict(base, method=m, quantity=q), log)
            if (q == "step" and "error" not in r and torch.device(args.device).type == "cpu" and not args.quick
                    and m.startswith(("deqdiff", "unrolled"))):
                # memory once more in a process whose RSS follows live tensors (harness.LIVE_RSS_ENV)
                live = run_worker(dict(base, method=m, quantity=q, memory_only=True), log, env_extra=harness.LIVE_RSS_ENV)
                r["live_memory"] = None if "error" in live else live
            ms.append(r)
    for m, src in SHARED_FWD.items():  # same forward solver and model: one measurement serves both
        f = _get(ms, src, "fwd")
        if m in methods and f is not None and _get(ms, m, "fwd") is None:
            ms.append({**f, "method": m, "shared_from": src})
    out = {"regime": regime, "rho": REGIMES[regime][0], "A": REGIMES[regime][1], "measurements": ms}
    if not args.skip_accuracy:
        acc_methods = [m for m in methods if m.startswith(("deqdiff", "unrolled"))]
        acc = run_worker(dict(kind="accuracy", regime=regime, batch=args.acc_batch, methods=acc_methods), log)
        if args.jax and "rows" in acc and not args.quick:
            ref_path = Path(args.out) / f".pinn_ref_{regime}.json"
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            ref_path.write_text(json.dumps(acc["ref"]))
            ja = run_worker(dict(kind="jax_accuracy", regime=regime, batch=args.acc_batch, ref_path=str(ref_path)), log)
            ref_path.unlink()
            acc["rows"].append(ja if "error" not in ja else {"method": "jax", "error": ja["error"]})
        acc.pop("ref", None)
        out["accuracy"] = acc
    return out


# --------------------------------------------------------------------------- tables


def _mem(m: dict) -> float:
    """Extra peak MiB of one step: the live-RSS run when there is one, else the timed run's."""
    return (m.get("live_memory") or {}).get("peak_mib", m["memory"]["peak_mib"])


def _get(ms, method, quantity):
    for m in ms:
        if m.get("method") == method and m.get("quantity") == quantity and "median_s" in m:
            return m
    return None


def _step_table(ms: list, ref_method: str, iters_header: str, ref_label: str) -> list[str]:
    """Rows of a time/memory table: one per method, ratios against ``ref_method``."""
    columns = ["method", "fwd solve s", "step s", "step ÷ own fwd", "extra peak MiB of a step: live (plain rss)",
               iters_header, f"vs {ref_label}: time, memory"]
    rows = []
    ref = _get(ms, ref_method, "step")
    for m in dict.fromkeys(x["method"] for x in ms if "method" in x):
        s, f = _get(ms, m, "step"), _get(ms, m, "fwd")
        if s is None:
            err = next((x.get("error", "") for x in ms if x.get("method") == m and "error" in x), "")
            rows.append([m, "–", f"failed: {err[-120:].replace(chr(10), ' ')}", "", "", "", ""])
            continue
        it = s.get("iterations") or (f or {}).get("iterations")
        its = f"{it['max']}/{it['mean']}" if it else "–"
        fs, ratio = (f"{f['median_s']:.4f}", f"{s['median_s'] / f['median_s']:.1f}×") if f else ("–", "–")
        vs = f"{s['median_s'] / ref['median_s']:.2f}×, {_mem(s) / max(_mem(ref), 1e-9):.2f}×" if ref else "–"
        rows.append([m, fs, f"{s['median_s']:.4f}", ratio, f"{_mem(s):.1f} ({s['memory']['peak_mib']:.0f})", its, vs])
    return [harness.markdown_table(columns, rows)]


def table_main(res: dict) -> str:
    return "\n".join(_step_table(res["measurements"], "deqdiff", "fwd iterations max/mean", "deqdiff"))


def table_targets(res: dict) -> str:
    ms = res["measurements"]
    rows = []
    deqs = [m for m in METHODS if m.startswith("deqdiff") and _get(ms, m, "step")]
    best = min(deqs, key=lambda m: _get(ms, m, "step")["median_s"]) if deqs else None
    lean = min(deqs, key=lambda m: _mem(_get(ms, m, "step"))) if deqs else None
    for un in ("unrolled", "unrolled-anderson"):
        u = _get(ms, un, "step")
        if u is None or best is None:
            continue
        b, l_ = _get(ms, best, "step"), _get(ms, lean, "step")
        spd = u["median_s"] / b["median_s"]
        mem = _mem(u) / max(_mem(l_), 1e-9)
        rows.append([f"speed: {un} ÷ {best}", f"{u['median_s']:.3f} / {b['median_s']:.3f} s = {spd:.2f}×", "≥ 3×",
                     "yes" if spd >= 3 else "NO"])
        rows.append([f"peak step memory: {un} ÷ {lean}", f"{_mem(u):.0f} / {_mem(l_):.1f} MiB = {mem:.1f}×", "≥ 20×",
                     "yes" if mem >= 20 else "NO"])
    u, d = _get(ms, "unrolled-anderson", "step"), _get(ms, "deqdiff", "step")
    if u and d:  # the same forward solver on both sides: PIDEQ's Anderson loop vs the library default
        spd, mem = u["median_s"] / d["median_s"], _mem(u) / max(_mem(d), 1e-9)
        rows.append(["speed, same Anderson forward: unrolled-anderson ÷ deqdiff",
                     f"{u['median_s']:.3f} / {d['median_s']:.3f} s = {spd:.2f}×", "≥ 3×", "yes" if spd >= 3 else "NO"])
        rows.append(["peak step memory, same Anderson forward: unrolled-anderson ÷ deqdiff",
                     f"{_mem(u):.0f} / {_mem(d):.1f} MiB = {mem:.1f}×", "≥ 20×", "yes" if mem >= 20 else "NO"])
    for mlp in ("mlp-4x20", "mlp-4x46"):
        p = _get(ms, mlp, "step")
        if p and best:
            r = _get(ms, best, "step")["median_s"] / p["median_s"]
            rows.append([f"epoch time: {best} ÷ {mlp}", f"{r:.2f}×", "≤ 3× (PIDEQ paper: 19×)", "yes" if r <= 3 else "NO"])
    j = _get(ms, "jax", "step")
    if j and best:
        r = j["median_s"] / _get(ms, best, "step")["median_s"]
        rows.append([f"time: JAX optimistix ÷ {best}", f"{j['median_s']:.3f} / {_get(ms, best, 'step')['median_s']:.3f} s = "
                     f"{r:.2f}×", "≥ 1× (no slower)", "yes" if r >= 1 else "NO"])
    acc = res.get("accuracy", {})
    if "rows" in acc:
        er = {r["method"]: r.get("rel_err") for r in acc["rows"]}
        if er.get("unrolled") is not None:
            for m in (m for m in METHODS if m.startswith("deqdiff")):
                if er.get(m) is not None:
                    rows.append([f"gradient rel. error (float64, tol 1e-4): {m} vs unrolled",
                                 f"{er[m]:.1e} vs {er['unrolled']:.1e}", "≤ unrolled's",
                                 "yes" if er[m] <= er["unrolled"] else "NO"])
    return harness.markdown_table(["target", "measured", "target", "met?"], rows)


def table_accuracy(acc: dict) -> str:
    if "rows" not in acc:
        return f"accuracy run failed: {acc.get('error', '?')[-300:]}"
    head = (f"Reference: {acc['reference']} (agrees with unrolled iteration to 1e-12 to "
            f"{acc['reference_vs_unrolled_1e-12']:.1e}); {acc['batch']} collocation points.\n\n")
    rows = []
    for r in acc["rows"]:
        e = f"{r['rel_err']:.1e}" if isinstance(r.get("rel_err"), float) else f"failed: {str(r.get('error'))[-100:]}"
        it = r.get("iterations")
        rows.append([r["method"], e, f"{it['max']}/{it['mean']}" if it else "–"])
    return head + harness.markdown_table(["method (tol 1e-4, float64)", "gradient rel. error", "fwd iterations max/mean"],
                                         rows)


def table_peers(p: dict) -> str:
    rows = [[r["name"], r["error"], ""] if "error" in r else [r["name"], f"{r['rel_err']:.1e}", "yes" if r["warned"] else "no"]
            for r in p.get("rows", [])]
    return (f"Problem: {p.get('problem')}; every solver at tol {p.get('tol')}.\n\n"
            + harness.markdown_table(["implementation", "PINN gradient rel. error", "warned?"], rows))


def table_train(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append([f"{r.get('model')} {r.get('width')}", f"failed: {r['error'][-150:]}", "", "", ""])
            continue
        ev = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in r["eval"].items())
        out.append([f"{r['model']} (width {r['width']})", r["parameters"], f"{r['epochs']} × {r['batch']}",
                    f"{r['s_per_epoch']:.4f}", ev])
    return harness.markdown_table(["model", "parameters", "epochs × points", "s/epoch", "final metrics"], out)


def table_pde_train(rows: list[dict]) -> str:
    out = [[r.get("method"), f"failed: {r['error'][-150:]}", "", "", "", "", ""] if "error" in r else
           [r["method"], r["parameters"], r["epochs"], f"{r['s_per_epoch']:.4f}", f"{r['rel_l2']:.2e}", f"{r['max_abs']:.2e}",
            r.get("fwd_iters_last") if r.get("fwd_iters_last") is not None else "–"] for r in rows]
    return harness.markdown_table(["model", "parameters", "epochs", "s/epoch", "rel. L2 error vs Cole–Hopf", "max abs error",
                                   "fwd iterations (last epoch)"], out)


def table_pde(res: dict) -> str:
    rows = _step_table(res["measurements"], "burgers-implicit", "fwd iterations", "implicit")
    rows.append("\n(A live figure of 0.0 MiB is below the resolution of the resident-set high-water mark.)")
    acc = res.get("accuracy", {})
    if "rows" in acc:
        rows.append(f"\nGradient accuracy (float64, CLI tolerance 1e-5, {acc['batch']} points) against {acc['reference']} "
                    f"(which agrees with unrolled iteration to 1e-12 to {acc['reference_vs_unrolled_1e-12']:.1e}): "
                    + "; ".join(f"{r['method']} {r['rel_err']:.1e}" for r in acc["rows"]) + ".")
    elif acc:
        rows.append(f"\naccuracy run failed: {acc.get('error', '?')[-200:]}")
    return "\n".join(rows)


def summary(res: dict) -> str:
    """Key figures of this run, computed from the tables below (so they always agree)."""
    out = ["**Summary of this run** (best deqdiff configuration per row; all ratios from the same run):\n"]
    for regime, r in res.get("regimes", {}).items():
        ms = r["measurements"]
        deqs = [m for m in METHODS if m.startswith("deqdiff") and _get(ms, m, "step")]
        u, default = _get(ms, "unrolled", "step"), _get(ms, "deqdiff", "step")
        if not deqs or u is None:
            continue
        best = min(deqs, key=lambda m: _get(ms, m, "step")["median_s"])
        b = _get(ms, best, "step")
        lean = min(deqs, key=lambda m: _mem(_get(ms, m, "step")))
        parts = [f"unrolled ÷ {best}: time {u['median_s'] / b['median_s']:.2f}× (target ≥ 3×)",
                 f"live peak memory {_mem(u):.0f} / {_mem(_get(ms, lean, 'step')):.0f} MiB = "
                 f"{_mem(u) / max(_mem(_get(ms, lean, 'step')), 1e-9):.1f}× ({lean}; target ≥ 20×)"]
        if default:
            parts.append(f"library default (Anderson, backward 'auto', forward-mode dy/dt) {default['median_s'] / u['median_s']:.2f}× "
                         f"the unrolled time")
            ua = _get(ms, "unrolled-anderson", "step")
            if ua:
                parts.append(f"same Anderson forward unrolled (PIDEQ's own loop) ÷ library default: "
                             f"time {ua['median_s'] / default['median_s']:.2f}×, live memory "
                             f"{_mem(ua) / max(_mem(default), 1e-9):.1f}×")
        mlp = [_get(ms, m, "step") for m in ("mlp-4x20", "mlp-4x46") if _get(ms, m, "step")]
        if mlp:
            parts.append("epoch time ÷ MLP PINN " + ", ".join(
                f"{b['median_s'] / m['median_s']:.0f}× ({m['method']})" for m in mlp) + " (target ≤ 3×)")
        j = _get(ms, "jax", "step")
        if j:
            parts.append(f"JAX optimistix ÷ {best} {j['median_s'] / b['median_s']:.2f}× (≥ 1× = deqdiff no slower)")
        it = (b.get("iterations") or {}).get("max")
        out.append(f"* `{regime}` ({it} forward iterations): " + "; ".join(parts) + ".")
    pde = res.get("pde", {}).get("measurements", [])
    pi, pu = _get(pde, "burgers-implicit", "step"), _get(pde, "burgers-unrolled", "step")
    if pi and pu:
        out.append(f"* Burgers step (third order) at a fresh initialization: implicit {pi['median_s'] / pu['median_s']:.1f}× "
                   f"the unrolled time ({(pi.get('iterations') or {}).get('max')} forward iterations, 24 states).")
    train_path = ROOT / "benchmarks" / "results" / "pinn_burgers_train.json"
    if train_path.exists():
        rows = {r["method"]: r for r in json.loads(train_path.read_text())["rows"] if "error" not in r}
        i, u = rows.get("burgers-implicit"), rows.get("burgers-unrolled")
        if i and u:
            out.append(f"* Burgers training ({i['epochs']} epochs): implicit {i['s_per_epoch']:.3f} s/epoch vs unrolled "
                       f"{u['s_per_epoch']:.3f} (unrolled ÷ implicit {u['s_per_epoch'] / i['s_per_epoch']:.2f}×: "
                       f"the trained map needs {u.get('fwd_iters_last')} plain iterations, Anderson "
                       f"{i.get('fwd_iters_last')}); same final rel. L2 error {i['rel_l2']:.2e} / {u['rel_l2']:.2e}.")
    peers = {r["name"]: r.get("rel_err") for r in res.get("peers", {}).get("rows", [])}
    tq = [v for k, v in peers.items() if k.startswith("torchdeq") and isinstance(v, float)]
    xi = [v for k, v in peers.items() if k.startswith("xitorch") and isinstance(v, float)]
    if tq or xi:
        out.append(f"* Peers on the PINN gradient: torchdeq {min(tq):.0%}–{max(tq):.0%} wrong without a warning; "
                   f"xitorch correct ({min(xi):.0e}–{max(xi):.0e})." if tq and xi else "* Peers: see the table.")
    return "\n".join(out) + "\n"


READING = """**How to read this.** Every method stops the forward iteration at the same rule
‖f(z) − z‖ ≤ 1e-4·‖f(z)‖ per sample; "unrolled" records those iterations in the autograd graph
(PIDEQ's approach), so its step costs ≈ K forward iterations plus their double backward and its
memory grows with K, while deqdiff's memory does not depend on K (only the linear solves'
state). The speed balance therefore depends on K and on the derivative solver: a Richardson
(plain-iteration) adjoint solve costs about as many map evaluations as the forward solve, a
dense LU costs n vector-Jacobian products to build the per-sample blocks (and B·n² floats of
memory), GMRES pays per-row small least squares at every iteration. At PIDEQ's initialization the
map contracts fast (K ≈ 7 at tol 1e-4) and unrolling is cheap; in the stress regime (K ≈ 44)
the implicit step is faster and much leaner. An MLP PINN step costs a handful of small matmuls
per point, while one DEQ step needs at least (K + derivative solves) × one 80×80 matvec per
point, so a ≤ 3× epoch-time ratio is out of reach for an 80-state DEQ on a CPU by operation
count alone. The PIDEQ paper's 19× was measured on a GPU at 10⁵ points (not available here).
"""


def _memory_method(res: dict) -> str:
    """How the run measured a step's memory (results from before the shared harness: ``ru_maxrss``)."""
    for r in res.get("regimes", {}).values():
        for m in r.get("measurements", []):
            if "memory" in m:
                return m["memory"].get("method", "ru_maxrss difference")
    return "VmHWM difference"


def render(res: dict) -> str:
    meta = res["meta"]
    out = ["## Physics-informed step (PIDEQ setup, Van der Pol): implicit vs unrolled vs MLP vs JAX\n",
           f"Command: `{meta['command']}`  \nDate: {meta['date']}; {meta['machine']}; torch {meta['torch']}"
           f"{'; jax ' + meta['jax'] if meta.get('jax') else ''}; {meta['dtype']} on {meta['device']}, "
           f"{meta['threads']} thread(s) per process; {meta['points']} collocation points; 80 states; tol {TOL:g} (Anderson "
           f"forward); loss IC + {LAM}·physics + {KAPPA}·‖∂f/∂z‖_F; medians of ≤{meta['repeats']} repeats; "
           f"extra peak memory of one step in a fresh process ({_memory_method(res)}). The machine is shared: "
           f"ratios within one run are what count. Wall time {meta.get('wall_s', '?')} s.\n",
           summary(res), READING]
    for regime, r in res["regimes"].items():
        out.append(f"### Regime `{regime}` (A: {r.get('A', '')}, ‖A‖₂ = {r['rho']})\n")
        out.append(table_main(r))
        out.append("\n**Targets**\n")
        out.append(table_targets(r))
        if "accuracy" in r:
            out.append("\n**Gradient accuracy**\n")
            out.append(table_accuracy(r["accuracy"]))
        out.append("")
    if "pde" in res:
        out.append(f"### Burgers step (third order: ∇_θ of a loss on u_xx), `deqdiff pinn burgers` model "
                   f"(24 states, ν = 0.1/π, tol 1e-5, fresh initialization), {res['pde']['points']} collocation "
                   f"+ 400 initial/boundary points\n")
        out.append(table_pde(res["pde"]))
        out.append("")
    cli_rows = []
    for prob in ("burgers", "heat"):
        path = ROOT / "benchmarks" / "results" / f"pinn_{prob}.json"
        if path.exists():
            r = json.loads(path.read_text())
            c = r["config"]
            cli_rows.append([f"`deqdiff pinn {prob}`", f"ν = {c['nu']:.4g}, T = {c['T']:g}, {c['n_states']} states, "
                             f"{c['epochs']} epochs × {c['n_collocation']} points", r["parameters"], f"{r['rel_l2']:.2e}",
                             f"{r['max_abs_error']:.2e}", f"{r['s_per_epoch']:.3f}", r["reference"]])
    if cli_rows:
        out.append("### PDE problems trained with the CLI defaults (`benchmarks/results/pinn_{burgers,heat}.json`)\n")
        out.append(harness.markdown_table(["command", "setup", "parameters", "rel. L2 error", "max abs error", "s/epoch",
                                           "reference"], cli_rows))
        out.append("\nFigures: `docs/figures/burgers_solution.png` (prediction, reference, error), "
                   "`docs/figures/burgers_slices.png`, `docs/figures/burgers_loss.png`.\n")
    train_path = ROOT / "benchmarks" / "results" / "pinn_burgers_train.json"
    if train_path.exists():
        tr = json.loads(train_path.read_text())
        out.append(f"### Burgers training, equal epochs (`{tr['command']}`, {tr['date']})\n")
        out.append(table_pde_train(tr["rows"]))
        out.append("")
    if "peers" in res:
        out.append("### Peers: can they produce the PINN gradient (second derivative of z*)?\n")
        out.append(table_peers(res["peers"]))
    if res.get("train"):
        out.append("\n### Equal training budget (Van der Pol trainer of `deqdiff.physics.vdp`)\n")
        out.append(table_train(res["train"]))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 1 min on an idle machine): 1000 points, few methods, no peers")
    p.add_argument("--points", type=int, default=None, help="collocation points (default 10⁴; 10⁵ on cuda)")
    p.add_argument("--regimes", default="init,hard")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=8.0, help="stop repeating after this many seconds (min 3)")
    p.add_argument("--acc-batch", type=int, default=100)
    p.add_argument("--train-epochs", type=int, default=0, help="equal-budget training of PIDEQ and MLPs (0: skip)")
    p.add_argument("--train-points", type=int, default=1000)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--pde-points", type=int, default=4000, help="Burgers collocation points (the CLI trains with 1000)")
    p.add_argument("--skip-pde", action="store_true")
    p.add_argument("--render-only", action="store_true", help="re-write the markdown from the JSON (no measuring)")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of an earlier results file with the same points/dtype/device and "
                        "replace only those measured now (to run regimes separately on a busy machine)")
    p.add_argument("--pde-train-epochs", type=int, default=0,
                   help="only train Burgers DEQ (implicit, unrolled) and MLPs for this many epochs each, write "
                        "pinn_burgers_train.json and exit (the main run's tables include that file)")
    p.add_argument("--with-jax", action="store_true", help="include JAX in --quick (compiling takes ~20 s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--md", default=str(ROOT / "benchmarks" / "results" / "pinn.md"))
    return p.parse_args(argv)


def _save(res: dict, args, t0: float) -> Path:
    """Write the JSON (and, for full runs, the markdown section) after every section, so an
    interrupted run keeps what it measured."""
    res["meta"]["wall_s"] = round(res["meta"].get("wall_s_before", 0.0) + time.perf_counter() - t0, 1)
    path = harness.write_json(Path(args.out) / args.json_name, res)
    if not args.quick:
        Path(args.md).write_text(render(res))
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads_env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = " ".join(filter(None, [threads_env, "PYTHONPATH=src python", "benchmarks/bench_pinn.py", *sys.argv[1:]]))
    if args.pde_train_epochs:
        rows = [run_worker(dict(kind="pde_train", method=m, epochs=args.pde_train_epochs), log, timeout=1800)
                for m in PDE_METHODS]
        harness.write_json(Path(args.out) / "pinn_burgers_train.json",
                           {"command": command, "date": datetime.date.today().isoformat(), "rows": rows})
        print(table_pde_train(rows))
        return
    if args.render_only:
        res = json.loads((Path(args.out) / ("pinn.json" if args.device == "cpu" else f"pinn_{args.device}.json")).read_text())
        Path(args.md).write_text(render(res))
        print(render(res))
        return
    if args.points is None:
        args.points = 1000 if args.quick else (100_000 if args.device.startswith("cuda") else 10_000)
    if args.quick:  # smoke run: one regime, few methods, no peers, no Burgers accuracy
        args.repeats, args.regimes, args.acc_batch = min(args.repeats, 2), "init", min(args.acc_batch, 20)
        args.skip_peers = True
    args.jax = jax_available() and not args.no_jax and (not args.quick or args.with_jax)
    if not jax_available() and not args.no_jax:
        log("jax/optimistix not importable: the JAX row is skipped (pip install jax optimistix)")
    args.json_name = "pinn_quick.json" if args.quick else (
        "pinn.json" if args.device == "cpu" else f"pinn_{args.device.split(':')[0]}.json")
    meta = {"command": command, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "jax": __import__("jax").__version__ if args.jax else None,
            **harness.machine_info(machine="summary", threads="threads"),
            "dtype": args.dtype, "device": args.device, "repeats": args.repeats, "points": args.points,
            "quick": args.quick, "tol": TOL, "loadavg_1min_start": os.getloadavg()[0]}
    res = {"meta": meta, "regimes": {}}
    prev = Path(args.out) / args.json_name
    if args.merge and prev.exists():  # add to / replace sections of an earlier run with the same setup
        old = json.loads(prev.read_text())
        same = all(old.get("meta", {}).get(k) == meta[k] for k in ("points", "dtype", "device"))
        if same:
            res = {**old, "meta": {**meta, "command": old["meta"]["command"] + "; then " + command,
                                   "wall_s_before": old["meta"].get("wall_s", 0.0)}}
            res.setdefault("regimes", {})
    t0 = time.perf_counter()
    for regime in filter(None, args.regimes.split(",")):
        log(f"[{regime}] A = {REGIMES[regime]}, {args.points} points")
        res["regimes"][regime] = run_regime(regime, args, log)
        _save(res, args, t0)
    if not args.skip_pde:
        log(f"[burgers] {args.pde_points} collocation points")
        res["pde"] = run_pde(args, log)
        _save(res, args, t0)
    if not args.skip_peers:
        res["peers"] = run_worker({"kind": "peers"}, log)
    if args.train_epochs:
        res["train"] = [run_worker(dict(kind="train", model=m, width=w, epochs=args.train_epochs, batch=args.train_points),
                                   log, timeout=900) for m, w in (("implicit", 80), ("mlp", 20), ("mlp", 46))]
    path = _save(res, args, t0)
    print(render(res))
    log(f"total wall time {res['meta']['wall_s']}s; JSON in {path}")


if __name__ == "__main__":
    main()
