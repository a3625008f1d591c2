"""Experiments behind the engine suggestions in benchmarks/RESULTS.md (not part of the core
benchmark; run after it, on an idle machine):

    PYTHONPATH=src python benchmarks/engine_experiments.py [--regimes hard,narrow] [--repeats 5]

1. ``gmres``: the engine's GMRES vs. a prototype batched GMRES (``gmres_bmm`` below: Krylov
   basis stored (m+1, S, N) contiguous, classical Gram–Schmidt with one re-orthogonalization
   as batched contractions, solution formed and checked once per cycle instead of whenever a
   row closes) registered through the public ``deqdiff.register_solver``; plus Richardson.
2. ``dense_memory``: extra peak memory of the PINN step with the dense backward as shipped vs.
   with the dense blocks released once their LU exists (monkeypatched here, in a subprocess).
3. ``forward``: cost per iteration of the forward solvers vs. a bare ``z = f(z)`` loop, and a
   fixed-point iteration that only evaluates the rows still running (row compaction), which
   needs to know which parameters are per-row (here x and t).

Everything is timed in float32 on the core benchmark's problems; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as bc  # noqa: E402
from deqdiff import register_solver  # noqa: E402
from deqdiff.solvers.base import Tracker, row_norm  # noqa: E402
from deqdiff.solvers.gmres import _givens  # noqa: E402
from deqdiff.solvers.linear import linear_start  # noqa: E402


# --------------------------------------------------------------------------- prototype GMRES


def _rotate(col: torch.Tensor, cs: torch.Tensor, sn: torch.Tensor, j: int) -> torch.Tensor:
    """Apply the j previous Givens rotations to a new Hessenberg column ``(S, j+2)``."""
    col = col.clone()
    for i in range(j):
        a, b = col[:, i].clone(), col[:, i + 1].clone()
        col[:, i] = cs[:, i] * a + sn[:, i] * b
        col[:, i + 1] = -sn[:, i] * a + cs[:, i] * b
    return col


def _cycle_solution(x, V, R, g, length):
    """x + Σ_k y_k V_k with R y = g on each row's first ``length`` directions."""
    j = R.shape[1]
    use = torch.arange(j, device=x.device)[None, :] < length[:, None]
    use = use & (R.diagonal(dim1=1, dim2=2).abs() > 0)
    eye = torch.eye(j, dtype=R.dtype, device=R.device)
    Rm = torch.where(use[:, :, None] & use[:, None, :], R, eye)
    y = torch.linalg.solve_triangular(Rm, torch.where(use, g, 0.0).unsqueeze(2), upper=True)[:, :, 0]
    return x + torch.einsum("ksn,sk->sn", V, y)


@register_solver("gmres_bmm", "linear", overwrite=True)
def gmres_bmm(op, b, x0=None, *, tol=1e-6, atol=0.0, max_iter=200, restart=20):
    """Restarted GMRES(m), batched over rows, CGS2 orthogonalization on a contiguous basis."""
    S, N = b.shape
    m = min(int(restart), N)
    eps = torch.finfo(b.dtype).eps
    x, r, bnorm = linear_start(op, b, x0)
    thresh = atol + tol * bnorm
    track = Tracker(x, tol, atol)
    running = track.update(0, x, torch.where(bnorm == 0, 0.0, row_norm(r)), bnorm)
    k, matvecs = 0, int(x0 is not None)
    while not track.finished and k < max_iter:
        beta = row_norm(r)
        V = b.new_zeros(m + 1, S, N)
        V[0] = r / torch.where(beta > 0, beta, 1.0)[:, None]
        R, g = b.new_zeros(S, m, m), b.new_zeros(S, m + 1)
        g[:, 0] = beta
        cs, sn = b.new_ones(S, m), b.new_zeros(S, m)
        active, length = running.clone(), torch.zeros(S, dtype=torch.long, device=b.device)
        for j in range(m):
            k += 1
            w = op.mv(V[j])
            matvecs += 1
            wnorm, Vj = row_norm(w), V[: j + 1]
            h = torch.einsum("ksn,sn->sk", Vj, w)
            w = w - torch.einsum("ksn,sk->sn", Vj, h)
            h2 = torch.einsum("ksn,sn->sk", Vj, w)
            w, h = w - torch.einsum("ksn,sk->sn", Vj, h2), h + h2
            hn = row_norm(w)
            breakdown = hn <= 10 * eps * wnorm
            V[j + 1] = torch.where(breakdown[:, None], 0.0, w / torch.where(breakdown, 1.0, hn)[:, None])
            col = _rotate(torch.cat([h, hn[:, None]], 1), cs, sn, j)
            cs[:, j], sn[:, j], col[:, j] = _givens(col[:, j], col[:, j + 1])
            R[:, : j + 1, j] = col[:, : j + 1]
            g[:, j + 1], g[:, j] = -sn[:, j] * g[:, j], cs[:, j] * g[:, j]
            length = torch.where(active, j + 1, length)
            active = active & ~((g[:, j + 1].abs() <= thresh) | breakdown)
            if not active.any() or k >= max_iter:
                break
        x = _cycle_solution(x, V[: j + 1], R[:, : j + 1, : j + 1], g[:, : j + 1], length)
        r = b - op.mv(x)
        matvecs += 1
        running = track.update(k, x, torch.where(bnorm == 0, 0.0, row_norm(r)), bnorm)
    return track.result, track.info("gmres_bmm", "linear", restart=m, matvecs=matvecs)


# --------------------------------------------------------------------------- helpers


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _deq_step(P, fs, bs, q):
    spec = dict(method="deqdiff", fsolver=fs, bsolver=bs, quantity=q)
    step = bc.make_step(spec, P)

    def run():
        st = {}
        grads = step(st)
        return grads, bc.summarize_stats(st)

    return run


# --------------------------------------------------------------------------- 1. GMRES


def exp_gmres(regime: str, repeats: int) -> list[dict]:
    P = bc.Problem(regime, None, torch.float32, "cpu")
    fs = "fixed_point"
    ref = None
    rows = []
    for q in ("grad", "pinn"):
        for bs in ("gmres", "gmres_bmm", "richardson"):
            t, (grads, stats) = _median_time(_deq_step(P, fs, bs, q), repeats)
            flat = bc._flat(grads)
            if bs == "gmres":
                ref = flat
            rows.append({"regime": regime, "quantity": q, "bsolver": bs, "median_s": t,
                         "derivative": stats["derivative"], "rel_diff_vs_gmres": bc._rel(flat, ref)})
    return rows


# --------------------------------------------------------------------------- 2. dense memory


def _dense_memory_worker(regime: str, release: bool) -> dict:
    import importlib

    ops = importlib.import_module("deqdiff.engine.operators")
    if release:
        orig = ops.Linearization.lu

        def lu(self):
            out = orig(self)
            self._blocks = None  # the LU is all the dense solves need afterwards
            return out

        ops.Linearization.lu = lu
    tiny = bc.Problem(regime, 8, torch.float32, "cpu")
    spec = dict(method="deqdiff", fsolver="anderson", bsolver="dense", quantity="pinn")
    bc.make_step(spec, tiny)({})
    P = bc.Problem(regime, None, torch.float32, "cpu")
    step = bc.make_step(spec, P)
    mem, _ = bc.measure_memory(step, "cpu")
    t = bc.time_repeats(step, "cpu", 3, 30)
    live = bc.measure_live_memory(step, "cpu")
    return {"regime": regime, "release_blocks": release, "rss_mib": mem["peak_mib"],
            "live_mib": live["peak_mib"] if live else None, "median_s": statistics.median(t)}


def exp_dense_memory(regime: str) -> list[dict]:
    rows = []
    for release in (False, True):
        cmd = [sys.executable, __file__, "--dense-worker", json.dumps([regime, release])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith(bc.MARK)]
        rows.append(json.loads(line[-1][len(bc.MARK):]) if line else {"error": out.stderr[-500:]})
    return rows


# --------------------------------------------------------------------------- 3. forward solves


def compacted_fixed_point(P, tol: float, max_iter: int = bc.MAX_ITER):
    """Plain iteration that only evaluates rows still above tol (x and t are per-row)."""
    A, U, a, b = (w.detach() for w in P.weights)
    z = P.z0()
    idx = torch.arange(P.batch)
    evaluated = 0
    with torch.no_grad():
        for _ in range(max_iter + 1):
            zi = z[idx]
            fz = bc.f(zi, A, U, a, b, P.x[idx], P.t[idx])
            evaluated += idx.numel()
            go = (fz - zi).norm(dim=1) > tol * fz.norm(dim=1)
            idx = idx[go]
            if idx.numel() == 0:
                break
            z[idx] = fz[go]
    return z, evaluated


def exp_forward(regime: str, repeats: int) -> dict:
    P = bc.Problem(regime, None, torch.float32, "cpu")
    K = bc.iterations_to_tol(P, bc.TOL)
    params = [p.detach() for p in P.params]

    def bare():
        z = P.z0()
        with torch.no_grad():
            for _ in range(K):
                z = bc.f(z, *params)
        return z

    out = {"regime": regime, "K": K}
    out["bare_loop_s"], _ = _median_time(bare, repeats)
    for fs in bc.FWD_SOLVERS:
        def solve(fs=fs):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return bc.deqdiff.fixed_point(bc.f, P.z0(), *params, solver=fs, tol=bc.TOL,
                                              max_iter=bc.MAX_ITER, batch_ndim=1, return_info=True)
        t, (z, info) = _median_time(solve, repeats)
        out[f"deqdiff_{fs}_s"] = t
        out[f"deqdiff_{fs}_iterations"] = bc._iters(info.forward.iterations)
    t, (zc, evaluated) = _median_time(lambda: compacted_fixed_point(P, bc.TOL), repeats)
    out["compacted_fixed_point_s"] = t
    out["compacted_rows_evaluated_fraction"] = evaluated / (P.batch * (K + 1))
    fz = bc.f(zc, *params)
    out["compacted_max_rel_residual"] = float(((fz - zc).norm(dim=1) / fz.norm(dim=1)).max())
    return out


# --------------------------------------------------------------------------- CLI


def main() -> None:
    p = argparse.ArgumentParser(description="engine experiments behind RESULTS.md")
    p.add_argument("--regimes", default="hard,narrow")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(bc.ROOT / "benchmarks" / "results" / "engine_experiments.json"))
    p.add_argument("--dense-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dense_worker:
        regime, release = json.loads(args.dense_worker)
        print(bc.MARK + json.dumps(_dense_memory_worker(regime, release)), flush=True)
        return
    res = {"gmres": [], "dense_memory": [], "forward": []}
    for regime in args.regimes.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["forward"].append(exp_forward(regime, args.repeats))
            print(json.dumps(res["forward"][-1]), flush=True)
            res["gmres"] += exp_gmres(regime, args.repeats)
            for r in res["gmres"][-6:]:
                print(json.dumps(r), flush=True)
        res["dense_memory"] += exp_dense_memory(regime)
        print(json.dumps(res["dense_memory"][-2:]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
