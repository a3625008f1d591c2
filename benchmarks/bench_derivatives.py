"""The DEQ loss Hessian: split formulas vs. double backward vs. unrolled autodiff, and the
Lanczos spectrum of a trained small DEQ (Gauss–Newton + dynamics-curvature split).

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_derivatives.py            # full run (~5-8 min, 2-core CPU)
    PYTHONPATH=src python benchmarks/bench_derivatives.py --quick    # smoke run (< 1 min)

Part 1 — Hessian-vector product ``H v`` of ``L(θ) = ½‖z*(θ) Cᵀ − Y‖²/B`` w.r.t. θ = (W, U, b) for

    f(z; W, U, b, x) = tanh(z Wᵀ + x Uᵀ + b),   z (B, n), x (B, 16),  W = 0.8·orthogonal,

widths n = 64, 128, 256, float64, every method at the same tolerance ``TOL`` (forward:
‖f(z)−z‖ ≤ TOL‖f(z)‖ per sample; derivative solves ‖b − Ax‖ ≤ TOL‖b‖):

* ``split``: ``deqdiff.fixed_point`` (no graph) + ``LossHessian(...).hvp(v)`` — λ (1 adjoint
  solve) and the product (1 forward + 1 adjoint solve), Term A (Gauss–Newton) + Term B (dynamics curvature);
* ``split/dense``: the same with ``solver="dense"`` (one batched LU of I − J shared by the
  three solves; ``auto`` already does this for n ≤ 64, so the row is shown for n > 64);
* ``split/product``: one more product with λ cached (the per-step cost inside Lanczos);
* ``split/gauss_newton``: the Gauss–Newton product alone (λ cached);
* ``double_backward``: ``torch.autograd.grad(L, θ, create_graph=True)`` through the engine's
  fixed point, then ``torch.autograd.grad(⟨g, v⟩, θ)``;
* ``unrolled``: K plain iterations z ← f(z) recorded by autograd (K = iterations every sample
  needs to meet TOL, found once in the parent, not charged), then the same double backward.

Backward solver ``auto`` (dense batched LU for n ≤ 64; above, Richardson with a GMRES
fallback) for split and double backward. Memory as in ``bench_core.py`` (``benchmarks/harness.py``): each (width, method) runs
in a fresh subprocess — warm-up on a 4-sample problem, then the extra peak resident memory of
one step (``VmHWM`` after − before, high-water mark reset first). Time: one subprocess per
width runs every method once untimed, then ``--repeats`` rounds that time each method once
(interleaved, so that the load of a shared machine hits all methods alike); medians. Agreement (in the parent process): all methods
on the same data (float64, 64 samples) compared with a tight reference (split at tol 1e-13).

Part 2 — Lanczos top-5 eigenvalues of the total Hessian and of its Gauss–Newton, dynamics and
head parts for a small fully connected DEQ (width 32, linear classifier head, cross-entropy)
trained briefly with Adam on scikit-learn's digits (‖W‖₂ ≤ 0.8 kept by projection after each
step); θ = all parameters (cell and head).
Verification on a width-8 model: Lanczos vs. ``eigvalsh`` of the dense terms and of the total
Hessian by ``torch.func`` through unrolled iterations (independent of the split formulas).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import deqdiff
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    import deqdiff
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/harness.py: timing, peak memory, fresh processes)

from deqdiff.derivatives import LossHessian, hessian_eigenvalues, lanczos  # noqa: E402

TOL = 1e-8
REF_TOL = 1e-13
D_IN = 16
RHO = 0.8
METHODS = ("split", "split/dense", "split/product", "split/gauss_newton", "double_backward", "unrolled")
QUICK_METHODS = ("split", "double_backward", "unrolled")
DT = torch.float64


# --------------------------------------------------------------------------- part 1: problem


def cell(z, W, U, b, x):
    return torch.tanh(z @ W.T + x @ U.T + b)


class Problem:
    """Weights, inputs, fixed head C, targets Y and a direction v, all from one seed."""

    def __init__(self, n: int, batch: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
        self.n, self.batch = n, batch
        W = RHO * torch.linalg.qr(r(n, n))[0]
        U, b = r(n, D_IN) / math.sqrt(D_IN), 0.1 * r(n)
        self.theta = [W, U, b]
        self.x = r(batch, D_IN)
        self.C = r(4, n) / math.sqrt(n)
        self.Y = r(batch, 4)
        self.v = [r(n, n) / n, r(n, D_IN) / n, r(n) / n]

    def loss(self, z):
        return 0.5 * ((z @ self.C.T - self.Y) ** 2).sum() / self.batch

    def z0(self):
        return torch.zeros(self.batch, self.n, dtype=DT)

    def leaves(self, grad: bool):
        return [t.clone().requires_grad_(grad) for t in self.theta]


def plain_iterations(P: Problem, tol: float, max_iter: int = 20_000) -> int:
    """K: plain iterations until every sample meets the forward rule (no graph)."""
    z = P.z0()
    with torch.no_grad():
        for k in range(max_iter):
            fz = cell(z, *P.theta, P.x)
            if bool(((fz - z).norm(dim=1) <= tol * fz.norm(dim=1)).all()):
                return k
            z = fz
    raise RuntimeError(f"plain iteration did not reach tol={tol}")


def hvp_split(P: Problem, tol: float, st: dict, term: str = "total", solver: str = "auto"):
    W, U, b = P.theta
    z, info = deqdiff.fixed_point(cell, P.z0(), W, U, b, P.x, batch_ndim=1, tol=tol, return_info=True)
    H = LossHessian(cell, z, (W, U, b, P.x), P.loss, (0, 1, 2), batch_ndim=1, tol=tol, solver=solver)
    out = H.vp(tuple(P.v), term)
    st["forward_iters"] = info.forward.max_iterations
    st["solve_iters"] = [s.max_iterations for s in H.solves]
    return out


def hvp_double_backward(P: Problem, tol: float, st: dict):
    th = P.leaves(True)
    z, info = deqdiff.fixed_point(cell, P.z0(), *th, P.x, batch_ndim=1, tol=tol, backward_tol=tol,
                                  return_info=True)
    g = torch.autograd.grad(P.loss(z), th, create_graph=True)
    out = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, P.v)), th)
    st["forward_iters"] = info.forward.max_iterations
    st["solve_iters"] = [s.max_iterations for s in info.derivatives]
    return out


def hvp_unrolled(P: Problem, K: int, st: dict):
    th = P.leaves(True)
    z = P.z0()
    for _ in range(K):
        z = cell(z, *th, P.x)
    g = torch.autograd.grad(P.loss(z), th, create_graph=True)
    st["forward_iters"] = K
    return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, P.v)), th)


def make_step(spec: dict, P: Problem):
    m, tol = spec["method"], spec["tol"]
    if m == "split":
        return lambda st: hvp_split(P, tol, st)
    if m == "split/dense":  # every solve by one batched LU of the (B, n, n) blocks
        return lambda st: hvp_split(P, tol, st, solver="dense")
    if m.startswith("split/"):  # λ cached: the cost of one more product
        W, U, b = P.theta
        z = deqdiff.fixed_point(cell, P.z0(), W, U, b, P.x, batch_ndim=1, tol=tol)
        H = LossHessian(cell, z, (W, U, b, P.x), P.loss, (0, 1, 2), batch_ndim=1, tol=tol)
        term = "total" if m == "split/product" else "gauss_newton"
        return lambda st: H.vp(tuple(P.v), term)
    if m == "double_backward":
        return lambda st: hvp_double_backward(P, tol, st)
    if m == "unrolled":
        return lambda st: hvp_unrolled(P, spec["K"], st)
    raise ValueError(m)


def worker_measure(spec: dict) -> dict:
    """Extra peak memory of one step of one method (fresh process; warm-up on 4 samples first)."""
    tiny = Problem(spec["n"], 4, seed=1)
    warm = dict(spec, K=min(spec.get("K", 1), 20))
    make_step(warm, tiny)({})  # warm-up: kernels, lazy imports
    del tiny
    P = Problem(spec["n"], spec["batch"])
    step = make_step(spec, P)
    m = harness.measure_step(step, 1, memory_only=True)
    return {**spec, "peak_mib": m["memory"]["peak_mib"], "memory": m["memory"], "stats": m["stats"],
            "warnings": sorted({w[:200] for w in m["warnings"]})}


def worker_timing(spec: dict) -> dict:
    """Wall time of every method at one width, interleaved (round r times each method once), so
    that the load of a shared machine hits all methods alike; one untimed step each first."""
    P = Problem(spec["n"], spec["batch"])
    steps = {m: make_step(dict(spec, method=m), P) for m in spec["methods"]}
    calls = {m: (lambda i, step=step: step({})) for m, step in steps.items()}
    times = harness.interleaved_times(calls, spec["repeats"], warmup=1, collect=True,
                                      budget_s=spec["budget_s"] * len(steps), min_rounds=3)
    return {"n": spec["n"], "times_s": times, "loadavg_1min_after": os.getloadavg()[0]}


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def worker_accuracy(spec: dict) -> dict:
    """All methods on the same data (float64) against a tight split reference."""
    P = Problem(spec["n"], spec["batch"])
    ref = _flat(hvp_split(P, REF_TOL, {}))
    outs = {
        "split": _flat(hvp_split(P, spec["tol"], {})),
        "double_backward": _flat(hvp_double_backward(P, spec["tol"], {})),
        "unrolled": _flat(hvp_unrolled(P, spec["K"], {})),
    }
    W, U, b = P.theta
    z = deqdiff.fixed_point(cell, P.z0(), W, U, b, P.x, batch_ndim=1, tol=REF_TOL)
    H = LossHessian(cell, z, (W, U, b, P.x), P.loss, (0, 1, 2), batch_ndim=1, tol=REF_TOL)
    split_sum = _flat(H.gauss_newton_vp(tuple(P.v))) + _flat(H.dynamics_vp(tuple(P.v)))
    names = list(outs)
    return {
        "n": spec["n"], "batch": spec["batch"], "tol": spec["tol"], "K": spec["K"],
        "rel_err_vs_tight": {k: _rel(v, ref) for k, v in outs.items()},
        "pairwise": {f"{a} vs {b}": _rel(outs[a], outs[b]) for i, a in enumerate(names) for b in names[i + 1:]},
        "gauss_newton_plus_dynamics_vs_total": _rel(split_sum, ref),
        "gauss_newton_share": float(_flat(H.gauss_newton_vp(tuple(P.v))).norm() / ref.norm()),
    }


# --------------------------------------------------------------------------- part 2: spectrum


def digits(n_train: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=DT)
    X = (X - X.mean(0)) / (X.std(0) + 1.0)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:n_train]
    return X[perm], y[perm]


def head(z, C, c):
    return z @ C.T + c


def train_deq(width: int, n_train: int, steps: int, seed: int = 0, max_norm: float = 0.8) -> dict:
    """A fully connected DEQ z = tanh(W z + U x + b), y = C z* + c, cross-entropy, Adam; after
    each step W is projected onto ‖W‖₂ ≤ ``max_norm`` so that the trained cell stays a
    contraction (and the unrolled reference of :func:`worker_check` converges)."""
    X, y = digits(n_train)
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.linalg.qr(torch.randn(width, width, generator=g, dtype=DT))[0]
    U = torch.randn(width, X.shape[1], generator=g, dtype=DT) / math.sqrt(X.shape[1])
    b = torch.zeros(width, dtype=DT)
    C = torch.randn(10, width, generator=g, dtype=DT) / math.sqrt(width)
    c = torch.zeros(10, dtype=DT)
    ps = [t.requires_grad_() for t in (W, U, b, C, c)]
    opt = torch.optim.Adam(ps, lr=1e-2)
    z0 = torch.zeros(len(X), width, dtype=DT)
    for _ in range(steps):
        z = deqdiff.fixed_point(cell, z0, W, U, b, X, batch_ndim=1, tol=1e-6)
        loss = torch.nn.functional.cross_entropy(head(z, C, c), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W.mul_(max_norm / torch.linalg.matrix_norm(W, 2).clamp_min(max_norm))
    with torch.no_grad():
        z, info = deqdiff.fixed_point(cell, z0, W, U, b, X, batch_ndim=1, tol=1e-12, max_iter=500, return_info=True)
        logits = head(z, C, c)
    return dict(params=[p.detach() for p in ps], X=X, y=y, z=z, forward_iters=info.forward.max_iterations,
                loss=float(torch.nn.functional.cross_entropy(logits, y)),
                accuracy=float((logits.argmax(1) == y).double().mean()),
                W_norm=float(torch.linalg.matrix_norm(W.detach(), 2)))


def hessian_of(model: dict) -> LossHessian:
    W, U, b, C, c = model["params"]
    y = model["y"]
    ce = lambda logits: torch.nn.functional.cross_entropy(logits, y)  # noqa: E731
    return LossHessian(cell, model["z"], (W, U, b, model["X"]), ce, (0, 1, 2), head=head, head_params=(C, c),
                       batch_ndim=1)


TERMS = ("total", "gauss_newton", "dynamics", "head")


def worker_lanczos(spec: dict) -> dict:
    t0 = time.perf_counter()
    model = train_deq(spec["width"], spec["n_train"], spec["steps"])
    t_train = time.perf_counter() - t0
    H = hessian_of(model)
    out = {"width": spec["width"], "n_train": spec["n_train"], "steps": spec["steps"], "dim": H.dim,
           "train_loss": model["loss"], "train_accuracy": model["accuracy"], "train_s": t_train,
           "forward_iters": model["forward_iters"], "W_norm": model["W_norm"], "num_iters": spec["num_iters"], "terms": {}}
    for term in TERMS:  # one Lanczos run per term gives both ends of its spectrum
        t1 = time.perf_counter()
        T, Q = lanczos(lambda v: H.flat_vp(v, term), H.dim, spec["num_iters"], seed=0)
        ev, S = torch.linalg.eigh(T)
        t2 = time.perf_counter()
        top = ev.flip(0)[:5]
        vecs = (Q.T @ S.flip(1)[:, :5]).T
        # certificate of each Ritz pair: ‖H q − θ q‖ / |θ| (one batched product, 2 solves)
        res = (H.flat_vp(vecs, term) - top[:, None] * vecs).norm(dim=1) / top.abs()
        out["terms"][term] = {"top5": top.tolist(), "bottom2": ev[:2].tolist(), "lanczos_s": t2 - t1,
                              "ritz_rel_residual": res.tolist()}
    return out


def worker_check(spec: dict) -> dict:
    """Small model: Lanczos vs. eigvalsh of the dense terms, and the dense total vs. the Hessian by
    torch.func through unrolled iterations (independent of the split formulas)."""
    model = train_deq(spec["width"], spec["n_train"], spec["steps"])
    H = hessian_of(model)
    out = {"width": spec["width"], "n_train": spec["n_train"], "dim": H.dim, "terms": {}}
    dense = {t: H.dense(t) for t in TERMS}
    for term in TERMS:
        ev = torch.linalg.eigvalsh(0.5 * (dense[term] + dense[term].T))
        top = hessian_eigenvalues(H, 5, "largest", term, num_iters=spec["num_iters"], seed=0)
        out["terms"][term] = {"lanczos_top5": top.tolist(), "dense_top5": ev.flip(0)[:5].tolist(),
                              "max_rel_diff": float(((top - ev.flip(0)[:5]).abs() / ev.abs().max()).max()),
                              "min_eig": float(ev.min())}
    W, U, b, C, c = model["params"]
    X, y = model["X"], model["y"]
    K = spec["unroll"]
    sizes = [t.numel() for t in (W, U, b, C, c)]

    def L(th):
        W_, U_, b_, C_, c_ = (q.reshape(r.shape) for q, r in zip(torch.split(th, sizes), (W, U, b, C, c)))
        z = torch.zeros(len(X), spec["width"], dtype=DT)
        for _ in range(K):
            z = cell(z, W_, U_, b_, X)
        return torch.nn.functional.cross_entropy(head(z, C_, c_), y)

    th = torch.cat([t.reshape(-1) for t in (W, U, b, C, c)])
    g = torch.func.grad(L)
    eye = torch.eye(th.numel(), dtype=DT)
    ref = torch.func.vmap(lambda v: torch.func.jvp(g, (th,), (v,))[1], chunk_size=32)(eye)
    out["unroll"] = K
    out["W_norm"] = model["W_norm"]
    with torch.no_grad():  # how far K plain iterations get (the reference's own accuracy)
        z = torch.zeros(len(X), spec["width"], dtype=DT)
        for _ in range(K):
            z = cell(z, W, U, b, X)
        out["unroll_rel_residual"] = float(((cell(z, W, U, b, X) - z).norm(dim=1) / z.norm(dim=1)).max())
    out["dense_total_vs_unrolled_rel"] = _rel(dense["total"], ref)
    out["sum_of_terms_vs_total_rel"] = _rel(dense["gauss_newton"] + dense["dynamics"] + dense["head"], dense["total"])
    ev_ref = torch.linalg.eigvalsh(0.5 * (ref + ref.T))
    out["dense_top5_unrolled"] = ev_ref.flip(0)[:5].tolist()
    return out


WORKERS = {"measure": worker_measure, "timing": worker_timing, "accuracy": worker_accuracy, "lanczos": worker_lanczos, "check": worker_check}


# --------------------------------------------------------------------------- orchestration


def run_in_process(spec: dict, log) -> dict:
    """Workers that measure no memory (accuracy, spectrum) need no fresh interpreter."""
    t0 = time.perf_counter()
    out = WORKERS[spec["kind"]](spec)
    log(f"  {spec['kind']} {spec.get('n', spec.get('width', ''))}: done [{time.perf_counter() - t0:.1f}s]")
    return out


def run_worker(spec: dict, log) -> dict:
    """Run the worker ``WORKERS[spec["kind"]]`` in a fresh interpreter (one thread unless
    OMP_NUM_THREADS says otherwise); a failure is returned as ``{**spec, "error": <stderr tail>}``."""
    try:
        run = harness.call_isolated(WORKERS[spec["kind"]], spec,
                                    env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    except harness.IsolatedRunError as e:
        err = (e.stderr.strip() or str(e))[-800:]
        log(f"  !! worker failed ({spec}): {err}")
        return {**spec, "error": err}
    out = run.data
    brief = {"measure": lambda: f"+{out['peak_mib']:.0f} MiB",
             "timing": lambda: ", ".join(f"{m} {statistics.median(t) * 1e3:.0f} ms" for m, t in out["times_s"].items())}
    log(f"  {spec['kind']} {spec.get('n', spec.get('width', ''))} {spec.get('method', '')}: "
        + brief.get(spec["kind"], lambda: "done")() + f" [{run.wall_s:.1f}s]")
    return out


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s:.1f} s"


def render(res: dict) -> str:
    meta = res["meta"]
    out = ["## Derivatives: loss-Hessian products and the Hessian spectrum\n",
           f"Command: `{meta['command']}` ({meta['date']}, torch {meta['torch']}, {meta['machine']}, "
           f"OMP_NUM_THREADS=1 per worker, float64, tol {meta['tol']:g}, batch {meta['batch']}, "
           f"{meta['repeats']} timed repeats (median), wall {meta.get('wall_s', '?')} s; 1-min load average "
           f"{meta.get('loadavg_1min_start', float('nan')):.1f} → {meta.get('loadavg_1min_end', float('nan')):.1f} "
           "on a machine shared with other jobs, so absolute times are inflated and noisy).\n",
           "Tables re-rendered from the JSON by `python benchmarks/bench_derivatives.py --render "
           "benchmarks/results/derivatives.json`.\n",
           "### Hessian-vector product of the loss w.r.t. θ = (W, U, b)\n",
           "Median time per product (ms) and extra peak RSS of one product (MiB, fresh process). "
           "`split` = forward solve + λ + product; `split/product` and `split/gauss_newton` = one more "
           "product with λ cached (the Lanczos step).\n"]
    widths = sorted({m["n"] for m in res["measure"]})
    table = []
    for meth in METHODS:
        rows = {m["n"]: m for m in res["measure"] if m.get("method") == meth and "error" not in m}
        if not rows:
            continue
        t = [fmt_ms(rows[n]["median_s"]) if n in rows else "–" for n in widths]
        mem = [("<1" if rows[n]["peak_mib"] < 1 else f"{rows[n]['peak_mib']:.0f}") if n in rows else "–" for n in widths]
        label = meth + (f" (K={rows[widths[0]]['K']}..{rows[widths[-1]]['K']} iters)" if meth == "unrolled" else "")
        table.append([label, *t, *mem])
    out += [harness.markdown_table(["method", *(f"n={n}: ms" for n in widths), *(f"n={n}: MiB" for n in widths)], table),
            ""]
    for n in widths:
        r = {m["method"]: m for m in res["measure"] if m["n"] == n and "error" not in m}
        if {"split", "split/product", "double_backward", "unrolled"} <= set(r):
            out.append(
                f"* n={n}: one more product with λ cached is {r['double_backward']['median_s'] / r['split/product']['median_s']:.1f}× "
                f"faster than a double backward (which repeats the forward solve and the first backward); the full "
                f"split pipeline costs {r['split']['median_s'] / r['double_backward']['median_s']:.2f}× the double backward; "
                f"unrolled autodiff takes {r['unrolled']['median_s'] / r['split']['median_s']:.2f}× the time of the split "
                f"pipeline and {r['unrolled']['peak_mib'] / max(r['split']['peak_mib'], 1):.1f}× its extra memory.")
    it = {m["n"]: m["stats"] for m in res["measure"] if m.get("method") == "split" and "stats" in m}
    if it:
        out.append("* Iterations (forward Anderson / each of the 3 linear solves of `split`, dense LU = 1): "
                   + "; ".join(f"n={n}: {st.get('forward_iters')} / {st.get('solve_iters')}" for n, st in sorted(it.items()))
                   + ". Unrolled autodiff needs only K plain iterations here (‖W‖₂ = 0.8), while every iteration "
                   "of a derivative solve costs products with J and Jᵀ (a JVP or VJP of f): the first product's time is of the "
                   "order of the unrolled one (ratios above), the implicit methods' memory does not grow with K, and "
                   "with λ cached every further product (a Lanczos step) is cheaper than a double backward.")
    out.append("\nAgreement (float64; relative L2 error vs. split at tol 1e-13):\n")
    agreement = [[a["n"], *(f"{a['rel_err_vs_tight'][k]:.1e}" for k in ("split", "double_backward", "unrolled")),
                  f"{a['pairwise']['split vs double_backward']:.1e}", f"{a['gauss_newton_plus_dynamics_vs_total']:.1e}"]
                 for a in res["accuracy"] if "error" not in a]
    out.append(harness.markdown_table(["n", "split", "double backward", "unrolled", "split vs double backward",
                                       "A + B vs total"], agreement))
    lz = res.get("lanczos")
    if lz and "error" not in lz:
        out.append(f"\n### Lanczos top-5 eigenvalues of a trained DEQ (digits, width {lz['width']}, "
                   f"{lz['n_train']} samples, {lz['steps']} Adam steps, train accuracy {lz['train_accuracy']:.3f}, "
                   f"loss {lz['train_loss']:.3f}; ‖W‖₂ ≤ 0.8 by projection; θ = cell + head, {lz['dim']} parameters; "
                   f"{lz['num_iters']} Lanczos iterations)\n")
        # "head": the linear head's own curvature (see docs/derivatives.md)
        out.append(harness.markdown_table(["term", "top-5 eigenvalues", "2 smallest", "Lanczos time (s)"], [
            [term, ", ".join(f"{x:.4g}" for x in r["top5"]), ", ".join(f"{x:.3g}" for x in r["bottom2"]),
             f"{r.get('lanczos_s', r.get('top5_s', 0)):.1f}"] for term, r in lz["terms"].items()]))
        out.append("\nConvergence certificate: the largest Ritz residual ‖Hq − θq‖/|θ| of the top-5 pairs is "
                   + ", ".join(f"{t} {max(r['ritz_rel_residual']):.1e}" for t, r in lz["terms"].items()) + ".")
    ck = res.get("check")
    if ck and "error" not in ck:
        out.append(f"\nVerification on a width-{ck['width']} model ({ck['dim']} parameters): dense total Hessian "
                   f"(split products on the basis) vs. `torch.func` through {ck['unroll']} unrolled iterations "
                   f"(their last relative residual {ck['unroll_rel_residual']:.1e}): "
                   f"{ck['dense_total_vs_unrolled_rel']:.1e} relative; GN + dynamics + head vs. total: "
                   f"{ck['sum_of_terms_vs_total_rel']:.1e}. Lanczos top-5 vs. `eigvalsh` of the dense term "
                   "(max |difference| / spectral radius):\n")
        out.append(harness.markdown_table(["term", "Lanczos top-5", "dense top-5", "max rel. diff", "smallest eigenvalue"], [
            [term, ", ".join(f"{x:.4g}" for x in r["lanczos_top5"]), ", ".join(f"{x:.4g}" for x in r["dense_top5"]),
             f"{r['max_rel_diff']:.1e}", f"{r['min_eig']:.3g}"] for term, r in ck["terms"].items()]))
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--batch", type=int, default=None, help="samples of the HVP problem (default 256; quick 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=5.0, help="per method: stop timing rounds after this many seconds (min 3 rounds)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown of a results JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quick = args.quick
    batch = args.batch or (32 if quick else 256)
    repeats = min(args.repeats, 2) if quick else args.repeats
    widths = [int(w) for w in args.widths.split(",")]
    methods = QUICK_METHODS if quick else METHODS
    if quick:
        widths = widths[:1]
    meta = {"command": " ".join(["PYTHONPATH=src python", "benchmarks/bench_derivatives.py", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(), **harness.machine_info("torch", machine="summary"),
            "tol": TOL, "batch": batch,
            "repeats": repeats, "quick": quick, "loadavg_1min_start": os.getloadavg()[0]}
    res = {"meta": meta, "measure": [], "accuracy": []}
    t0 = time.perf_counter()
    Ks = {}
    for n in widths:  # the workers read their own VmHWM: the parent's size does not enter
        K = Ks[n] = plain_iterations(Problem(n, batch), TOL)
        log(f"width {n}: plain iterations to tol = {K}")
        meths = [m for m in methods if not (m == "split/dense" and n <= 64)]  # auto is already dense there
        base = dict(n=n, batch=batch, tol=TOL, K=K)
        timing = run_worker(dict(base, kind="timing", methods=meths, repeats=repeats, budget_s=args.budget), log)
        for meth in meths:
            m = run_worker(dict(base, kind="measure", method=meth), log)
            if "error" not in timing:
                m["times_s"] = timing["times_s"][meth]
                m["median_s"] = statistics.median(m["times_s"])
                m["loadavg_1min_after"] = timing["loadavg_1min_after"]
            res["measure"].append(m)
    for n in widths:
        res["accuracy"].append(run_in_process(dict(kind="accuracy", n=n, batch=min(batch, 64), tol=TOL,
                                                   K=plain_iterations(Problem(n, min(batch, 64)), TOL)), log))
    lz = dict(kind="lanczos", width=16 if quick else 32, n_train=100 if quick else 500, steps=10 if quick else 100,
              num_iters=20 if quick else 60)
    res["lanczos"] = run_in_process(lz, log)
    res["check"] = run_in_process(dict(kind="check", width=4 if quick else 8, n_train=100 if quick else 200,
                                   steps=10 if quick else 100, num_iters=40 if quick else 120,
                                   unroll=60 if quick else 200), log)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_1min_end"] = os.getloadavg()[0]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    harness.write_json(out_dir / f"derivatives{suffix}.json", res)
    text = render(res)
    if not quick:
        (ROOT / "benchmarks" / "results" / "derivatives.md").write_text(text)
    print(text)
    log(f"total wall time {meta['wall_s']}s")


if __name__ == "__main__":
    main()
