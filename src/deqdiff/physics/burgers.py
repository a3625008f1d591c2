"""Physics-informed DEQ for a PDE with a second spatial derivative: 1D viscous Burgers

    u_t + c·u·u_x = ν·u_xx,   x ∈ [−1, 1], t ∈ [0, T],   u(0, x) = −sin(πx),   u(±1, t) = 0,

with c = 1 (Burgers) or c = 0 (heat equation u_t = ν u_xx, analytic u = −sin(πx)·e^{−νπ²t}).

Model: ``u(x, t) = C·z* + D·[x, s]`` with ``z* = tanh(A z* + U·[x, s] + b)``
and ``s = 2t/T − 1`` (time scaled to [−1, 1]). The residual needs ``u_t``, ``u_x``, ``u_xx``:
with ``mode="implicit"`` they come from implicit forward-mode solves (Pacheco 2023, eq. deq-jacobian
and its derivative along x: ``(I − J) z_xx = D²f[(z_x, ẋ), (z_x, ẋ)]``, as in
``deqdiff.derivatives.time_derivatives``, but with one shared equilibrium for the x and t
directions and for u itself), kept with their graph, so the gradient of the loss
w.r.t. the weights differentiates ``z_xx`` once more — third order in total, all by linear
solves with ``I − ∂f/∂z`` at z*. ``mode="unrolled"`` is the PIDEQ paper's baseline: plain
iterations recorded by autograd until the same stopping rule ``‖f(z) − z‖ ≤ tol‖f(z)‖`` holds
for every point (or exactly ``unroll_iters`` of them), and reverse-mode derivatives through
them. ``model="mlp"`` is the explicit PINN baseline (``deqdiff.physics.MLP``, tanh, same loss).

Reference solution: Cole–Hopf (Basdevant et al. 1986),

    u(x, t) = −∫ sin(π(x−η)) φ₀(x−η) G(η) dη / ∫ φ₀(x−η) G(η) dη,
    φ₀(y) = exp(−cos(πy)/(2πν)),  G(η) = exp(−η²/(4νt)),

by the trapezoidal rule in ``η = √(4νt)·s`` (spectrally accurate for this smooth, fast-decaying
integrand) with log-sum-exp scaling; an independent finite-difference solver
(:func:`reference_fd`, method of lines) checks it in the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..derivatives import input_derivatives
from ..engine import fixed_point
from ..training.checkpoint import PINN_FORMAT, read_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = [
    "PDEConfig", "PROBLEMS", "PDEDEQ", "PDEMLP", "cell", "pde_terms", "residual", "initial_condition",
    "pde_loss", "reference_solution", "reference_fd", "train", "evaluate", "checkpoint", "resume_state",
    "add_arguments", "prepare", "execute", "run",
]

#: convection coefficient c of each problem
PROBLEMS = {"burgers": 1.0, "heat": 0.0}
MODES = ("implicit", "unrolled")
MODELS = ("deq", "mlp")


# --------------------------------------------------------------------------- configuration


@dataclass
class PDEConfig:
    """Everything that defines a training run (stored in results and checkpoints)."""

    problem: str = "burgers"
    nu: float = 0.1 / math.pi
    T: float = 1.0
    n_states: int = 24
    epochs: int = 1500
    n_collocation: int = 1000
    n_initial: int = 200
    n_boundary: int = 200
    lr: float = 1e-2
    lam_ic: float = 1.0
    lam_bc: float = 1.0
    lam_pde: float = 1.0
    kappa: float = 0.0  # Jacobian regularization weight (mean ‖∂f/∂z‖_F²)
    tol: float = 1e-5
    solver: str = "anderson"
    max_iter: int = 100
    mode: str = "implicit"
    model: str = "deq"
    mlp_width: int = 20
    mlp_depth: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    eval_nx: int = 201
    eval_nt: int = 101

    def validate(self) -> "PDEConfig":
        if self.problem not in PROBLEMS:
            raise ValueError(f"unknown problem {self.problem!r}; choose one of {sorted(PROBLEMS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODELS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("nu", "T", "lr", "tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("lam_ic", "lam_bc", "lam_pde", "kappa"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and ≥ 0, got {v!r}")
        for name in ("n_states", "n_collocation", "n_initial", "n_boundary", "max_iter", "eval_nx", "eval_nt",
                     "mlp_width", "mlp_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be ≥ 0, got {self.epochs}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        return self

    @property
    def convection(self) -> float:
        return PROBLEMS[self.problem]

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]


# --------------------------------------------------------------------------- model


def cell(z: Tensor, A: Tensor, U: Tensor, b: Tensor, x: Tensor, s: Tensor) -> Tensor:
    """``f(z) = tanh(z Aᵀ + [x, s] Uᵀ + b)`` row-wise: z (B, n), x and s (B,)."""
    # fused addmm: broadcasting adds go through slow Python decompositions under forward AD
    return torch.tanh(torch.addmm(torch.addmm(b, torch.stack([x, s], 1), U.T), z, A.T))


class PDEDEQ(nn.Module):
    """``u(x, t) = C z* + D·[x, s]``, ``z* = tanh(A z* + U[x, s] + b)``, ``s = 2t/T − 1``.

    ``A`` starts with spectral norm ``a_scale`` (a contraction); training keeps it well posed
    with the Jacobian regularization of the loss (``kappa``) when needed. ``last_info`` holds
    the forward solve's :class:`~deqdiff.FixedPointInfo` (implicit mode).
    """

    def __init__(self, n_states: int = 24, T: float = 1.0, *, mode: str = "implicit", solver: str = "anderson",
                 tol: float = 1e-5, max_iter: int = 100, unroll_iters: int | None = None, a_scale: float = 0.5,
                 u_scale: float = 2.0, generator: torch.Generator | None = None, dtype=torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if n_states < 1 or not T > 0:
            raise ValueError(f"need n_states ≥ 1 and T > 0, got n_states={n_states}, T={T}")
        g = generator
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        A = r(n_states, n_states)
        A = a_scale * A / torch.linalg.matrix_norm(A, 2)
        self.A = nn.Parameter(A.to(dtype))
        self.U = nn.Parameter((u_scale * r(n_states, 2) / math.sqrt(2)).to(dtype))
        self.b = nn.Parameter((0.5 * r(n_states)).to(dtype))
        self.C = nn.Parameter((r(n_states) / math.sqrt(n_states)).to(dtype))
        self.D = nn.Parameter(torch.zeros(2, dtype=dtype))
        self.T, self.mode, self.solver, self.tol, self.max_iter = float(T), mode, solver, tol, max_iter
        self.unroll_iters = unroll_iters
        self.last_info = None
        self.last_iterations: int | None = None

    @property
    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.A, self.U, self.b

    def scaled_time(self, t: Tensor) -> Tensor:
        return 2.0 * t / self.T - 1.0

    def equilibrium(self, x: Tensor, s: Tensor, **overrides) -> Tensor:
        """z*(x, s) per sample: an implicit fixed-point node, or K unrolled iterations."""
        z0 = torch.zeros(x.shape[0], self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        if self.mode == "unrolled":
            return self._unrolled(z0, x, s, overrides.get("unroll_iters", self.unroll_iters))
        opts = dict(solver=self.solver, tol=self.tol, max_iter=self.max_iter, on_fail="warn")
        opts.update(overrides)
        k = len(self.weights)  # x and s are per point: converged points drop out of the solve
        z, self.last_info = fixed_point(cell, z0, *self.weights, x, s, batch_ndim=1, return_info=True,
                                        row_params=(k, k + 1), **opts)
        return z

    def _unrolled(self, z: Tensor, x: Tensor, s: Tensor, K: int | None) -> Tensor:
        """Plain iteration recorded by autograd: exactly ``K`` steps, or until every row meets
        ``‖f(z) − z‖ ≤ tol·‖f(z)‖`` (the iterate that met it is returned, as in deqdiff)."""
        for k in range(K if K is not None else self.max_iter + 1):
            fz = cell(z, *self.weights, x, s)
            if K is None:
                with torch.no_grad():
                    done = bool(((fz - z).norm(dim=1) <= self.tol * fz.norm(dim=1)).all())
                if done:
                    self.last_iterations = k
                    return z
            z = fz
        self.last_iterations = K if K is not None else self.max_iter
        if K is None:
            import warnings

            warnings.warn(f"unrolled iteration did not reach tol={self.tol} in {self.max_iter} steps", stacklevel=3)
        return z

    def head(self, z: Tensor, x: Tensor, s: Tensor) -> Tensor:
        return z @ self.C + self.D[0] * x + self.D[1] * s

    def forward(self, x: Tensor, t: Tensor, **overrides) -> Tensor:
        s = self.scaled_time(t)
        return self.head(self.equilibrium(x, s, **overrides), x, s)

    def jacobian_frobenius_sq(self, z: Tensor) -> Tensor:
        """Mean over samples of ``‖∂f/∂z‖_F²`` at z: for tanh, ``J = diag(1 − f²) A`` so
        ``‖J‖_F² = Σ_i (1 − z_i²)² ‖A_i,:‖²`` (exact, no probes; f(z*) = z*)."""
        return (((1 - z ** 2) ** 2) @ (self.A ** 2).sum(1)).mean()


class PDEMLP(nn.Module):
    """Explicit PINN baseline ``u(x, t) = MLP([x, 2t/T − 1])`` (tanh, ``depth`` × ``width``)."""

    mode = "unrolled"  # derivatives by reverse-mode autograd, like the unrolled DEQ

    def __init__(self, width: int = 20, depth: int = 4, T: float = 1.0, dtype=torch.float32):
        super().__init__()
        from .models import MLP

        self.net = MLP(2, 1, width, depth).to(dtype)
        self.T = float(T)
        self.last_info = None
        self.last_iterations = None

    def scaled_time(self, t: Tensor) -> Tensor:
        return 2.0 * t / self.T - 1.0

    def equilibrium(self, x: Tensor, s: Tensor, **_) -> Tensor:
        return torch.stack([x, s], 1)  # "features": the head is the whole network

    def head(self, z: Tensor, x: Tensor, s: Tensor) -> Tensor:
        return self.net(torch.stack([x, s], 1))[:, 0]

    def forward(self, x: Tensor, t: Tensor, **_) -> Tensor:
        s = self.scaled_time(t)
        return self.head(None, x, s)


def pde_terms(model: PDEDEQ, x: Tensor, t: Tensor) -> dict[str, Tensor]:
    """``u, u_t, u_x, u_xx`` (and z*) at the points ``(x, t)``, all with their graph w.r.t.
    the weights. Implicit mode: forward-mode implicit solves (z_x, z_xx: 2 solves; z_s: 1);
    unrolled mode: reverse-mode autograd (create_graph) through the unrolled iterations."""
    s = model.scaled_time(t)
    if model.mode == "unrolled":
        x = x.detach().requires_grad_()
        s = s.detach().requires_grad_()
        z = model.equilibrium(x, s)
        u = model.head(z, x, s)
        u_x, u_s = torch.autograd.grad(u.sum(), (x, s), create_graph=True)
        (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=True)
        return {"z": z, "u": u, "u_t": u_s * (2.0 / model.T), "u_x": u_x, "u_xx": u_xx}
    with torch.no_grad():  # z* only; every derivative (and u itself) comes from input_derivatives
        z = model.equilibrium(x, s)
    # one linearization of I − J for all three solves and one re-entry of z* for u too: a
    # second fixed-point node for u would cost one more adjoint solve in the backward pass
    z, d = input_derivatives(cell, z, (*model.weights, x, s), {"x": 3, "s": 4}, second=("x",),
                             batch_ndim=1, tol=model.tol, on_fail="warn")
    z_x, z_s, z_xx = d["x"], d["s"], d["xx"]  # (I − J) z_x = f_x, z_s = f_s, z_xx = D²f[·,·]
    C, D = model.C, model.D
    return {"z": z, "u": model.head(z, x, s), "u_t": (z_s @ C + D[1]) * (2.0 / model.T),
            "u_x": z_x @ C + D[0], "u_xx": z_xx @ C}


def residual(terms: dict[str, Tensor], nu: float, convection: float) -> Tensor:
    """``r = u_t + c·u·u_x − ν·u_xx`` at every collocation point."""
    return terms["u_t"] + convection * terms["u"] * terms["u_x"] - nu * terms["u_xx"]


def initial_condition(x: Tensor) -> Tensor:
    return -torch.sin(math.pi * x)


def pde_loss(model: PDEDEQ, cfg: PDEConfig, pts: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """``λ_ic·mean((u(x,0) − u₀)²) + λ_bc·mean(u(±1,t)²) + λ_pde·mean(r²) + κ·mean‖∂f/∂z‖_F²``.

    All points go through one model call (one fixed point per row, samples never mix): the
    derivative rows of the initial/boundary points are computed and unused, which costs less
    than two more fixed points and their adjoints."""
    n, n_ic = pts["x_col"].shape[0], pts["x_ic"].shape[0]
    x0 = pts["x_ic"]
    x = torch.cat([pts["x_col"], x0, pts["x_bc"]])
    t = torch.cat([pts["t_col"], torch.zeros_like(x0), pts["t_bc"]])
    terms = pde_terms(model, x, t)
    r = residual({k: v[:n] for k, v in terms.items()}, cfg.nu, cfg.convection)
    l_pde = (r ** 2).mean()
    u = terms["u"]
    l_ic = ((u[n:n + n_ic] - initial_condition(x0)) ** 2).mean()
    l_bc = (u[n + n_ic:] ** 2).mean()
    loss = cfg.lam_ic * l_ic + cfg.lam_bc * l_bc + cfg.lam_pde * l_pde
    parts = {"ic": l_ic.item(), "bc": l_bc.item(), "pde": l_pde.item()}
    if cfg.kappa > 0 and isinstance(model, PDEDEQ):
        l_jac = model.jacobian_frobenius_sq(terms["z"][:n])
        loss = loss + cfg.kappa * l_jac
        parts["jac"] = l_jac.item()
    return loss, parts


# --------------------------------------------------------------------------- reference solutions


def reference_solution(x, t, nu: float, convection: float = 1.0, n_quad: int = 2001, chunk: int = 4096) -> np.ndarray:
    """Exact u(x, t) (broadcast shapes): heat (c = 0) in closed form, Burgers (c = 1) by the
    Cole–Hopf integral with the trapezoidal rule on ``s ∈ [−10, 10]`` (``n_quad`` nodes)."""
    if not nu > 0:
        raise ValueError(f"nu must be > 0, got {nu}")
    x, t = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64))
    if np.any(t < 0):
        raise ValueError("t must be ≥ 0")
    if convection == 0.0:
        return -np.sin(np.pi * x) * np.exp(-nu * np.pi ** 2 * t)
    if convection != 1.0:
        raise ValueError(f"the Cole–Hopf reference needs convection 1 (Burgers) or 0 (heat), got {convection}")
    xs, ts = x.ravel(), t.ravel()
    out = np.empty_like(xs)
    s = np.linspace(-10.0, 10.0, n_quad)
    logG = -s ** 2
    for i in range(0, xs.size, chunk):
        xi, ti = xs[i:i + chunk, None], ts[i:i + chunk, None]
        y = xi - np.sqrt(4 * nu * ti) * s  # x − η
        logw = -np.cos(np.pi * y) / (2 * np.pi * nu) + logG
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        out[i:i + chunk] = -(np.sin(np.pi * y) * w).sum(1) / w.sum(1)
    return out.reshape(x.shape)


def reference_fd(nu: float, T: float, nx: int = 401, nt: int = 11, convection: float = 1.0):
    """Independent check: method of lines on a uniform grid (central differences, conservative
    flux ∂ₓ(u²/2) for the convection), integrated by ``scipy.integrate.solve_ivp`` (BDF).
    Returns ``(x, t, u)`` with ``u`` of shape (nt, nx)."""
    from scipy.integrate import solve_ivp

    x = np.linspace(-1.0, 1.0, nx)
    h = x[1] - x[0]

    def rhs(_, v):
        u = np.concatenate([[0.0], v, [0.0]])
        diff = (u[2:] - 2 * u[1:-1] + u[:-2]) / h ** 2
        conv = (u[2:] ** 2 - u[:-2] ** 2) / (4 * h)
        return nu * diff - convection * conv

    t = np.linspace(0.0, T, nt)
    sol = solve_ivp(rhs, (0.0, T), -np.sin(np.pi * x[1:-1]), method="BDF", t_eval=t, rtol=1e-9, atol=1e-11)
    u = np.zeros((nt, nx))
    u[:, 1:-1] = sol.y.T
    return x, t, u


# --------------------------------------------------------------------------- training


def sample_points(cfg: PDEConfig, g: torch.Generator, dtype, device) -> dict[str, Tensor]:
    """Uniform random collocation, initial and boundary points (fresh every epoch)."""
    rnd = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    x_bc = torch.where(rnd(cfg.n_boundary) < 0.5, -1.0, 1.0)
    pts = {"x_col": 2 * rnd(cfg.n_collocation) - 1, "t_col": cfg.T * rnd(cfg.n_collocation),
           "x_ic": 2 * rnd(cfg.n_initial) - 1, "x_bc": x_bc, "t_bc": cfg.T * rnd(cfg.n_boundary)}
    return {k: v.to(dtype=dtype, device=device) for k, v in pts.items()}


def build(cfg: PDEConfig):
    """Model, optimizer, LR schedule and the point sampler's generator, all from ``cfg.seed``."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.model == "mlp":
        model = PDEMLP(cfg.mlp_width, cfg.mlp_depth, cfg.T, dtype=cfg.torch_dtype).to(cfg.device)
    else:
        model = PDEDEQ(cfg.n_states, cfg.T, mode=cfg.mode, solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter,
                       generator=g, dtype=cfg.torch_dtype).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.lr / 50)
    return model, opt, sched, g


def evaluate(model: PDEDEQ, cfg: PDEConfig) -> dict:
    """Prediction and reference on a (eval_nt × eval_nx) grid; relative L2 and max errors."""
    xs = np.linspace(-1, 1, cfg.eval_nx)
    ts = np.linspace(0, cfg.T, cfg.eval_nt)
    X, Tm = np.meshgrid(xs, ts)
    ref = reference_solution(X, Tm, cfg.nu, cfg.convection)
    dev, dt = cfg.device, cfg.torch_dtype
    with torch.no_grad():
        opts = {"on_fail": "ignore"} if getattr(model, "mode", None) == "implicit" else {}
        pred = model(torch.as_tensor(X.ravel(), dtype=dt, device=dev),
                     torch.as_tensor(Tm.ravel(), dtype=dt, device=dev), **opts)
    pred = pred.double().cpu().numpy().reshape(X.shape)
    err = pred - ref
    return {"x": xs, "t": ts, "pred": pred, "ref": ref,
            "rel_l2": float(np.linalg.norm(err) / np.linalg.norm(ref)), "max_abs": float(np.abs(err).max())}


def train(cfg: PDEConfig, *, progress: bool = False, state: dict | None = None, log_every: int = 10,
          until: int | None = None, checkpoint_path: str | Path | None = None, checkpoint_every: int = 0):
    """Train for ``cfg.epochs`` full-batch Adam steps (fresh points each epoch; stop early
    at epoch ``until``). With ``state`` (a checkpoint dict) training continues where it
    stopped, bit-identically; if the checkpoint's run had another ``epochs``, the learning rate
    anneals (cosine) from its current value to the final one over the epochs that remain. With
    ``checkpoint_path``, a checkpoint is written every ``checkpoint_every`` epochs, so an
    interrupted run can resume.
    Returns ``(model, history, extras)``; ``extras`` has the objects to checkpoint."""
    model, opt, sched, g = build(cfg)
    history: dict[str, list] = {"epoch": [], "loss": [], "ic": [], "bc": [], "pde": [], "fwd_iters": [], "time_s": []}
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        if "rng" in state:
            set_rng_state(state["rng"])
        history, start = state["history"], int(state["epoch"])
        if int(state["config"]["epochs"]) != cfg.epochs and cfg.epochs > start:
            sched = _reanneal(opt, cfg, cfg.epochs - start)
    stop = cfg.epochs if until is None else min(until, cfg.epochs)
    bar = range(start, stop)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc=f"pinn {cfg.problem}", initial=start, total=cfg.epochs, dynamic_ncols=True)
    t0 = time.perf_counter() - (history["time_s"][-1] if history["time_s"] else 0.0)  # time since the run began
    for epoch in bar:
        pts = sample_points(cfg, g, cfg.torch_dtype, cfg.device)
        opt.zero_grad(set_to_none=True)
        loss, parts = pde_loss(model, cfg, pts)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch} (parts {parts}); lower --lr or raise --kappa")
        loss.backward()
        opt.step()
        sched.step()
        its = model.last_info.forward.iterations.max().item() if model.last_info is not None else model.last_iterations
        if epoch % log_every == 0 or epoch == cfg.epochs - 1:
            history["epoch"].append(epoch)
            history["loss"].append(loss.item())
            for k in ("ic", "bc", "pde"):
                history[k].append(parts[k])
            history["fwd_iters"].append(its)
            history["time_s"].append(time.perf_counter() - t0)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.2e}", pde=f"{parts['pde']:.1e}", it=its)
        if checkpoint_path is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            extras = {"optimizer": opt, "scheduler": sched, "generator": g, "epoch": epoch + 1}
            save_checkpoint(checkpoint_path, checkpoint(model, history, extras, cfg), format=PINN_FORMAT)
    extras = {"optimizer": opt, "scheduler": sched, "generator": g, "epoch": max(stop, start)}
    return model, history, extras


def _reanneal(opt: torch.optim.Optimizer, cfg: PDEConfig, remaining: int):
    """Cosine annealing from the current learning rate to the run's final one (``lr/50``) over
    ``remaining`` epochs: the schedule of a run resumed with another ``epochs``."""
    for group in opt.param_groups:
        group.pop("initial_lr", None)  # the new schedule starts from the current rate
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=remaining, eta_min=cfg.lr / 50)


def checkpoint(model, history, extras, cfg: PDEConfig) -> dict:
    """Everything the next epoch depends on (``epoch``: the next epoch to run)."""
    return {"config": asdict(cfg), "model": model.state_dict(), "optimizer": extras["optimizer"].state_dict(),
            "scheduler": extras["scheduler"].state_dict(), "generator": extras["generator"].get_state(),
            "rng": rng_state(), "history": history, "epoch": extras["epoch"]}


#: flags whose names differ from their config field
_FLAGS = {"n_states": "--states", "n_collocation": "--collocation", "n_initial": "--initial-points",
          "n_boundary": "--boundary-points"}
#: settings a resumed run may change: they only affect the evaluation or the device
_EVALUATION_ONLY = frozenset({"device", "eval_nx", "eval_nt"})


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def resume_state(cfg: PDEConfig, path: str | Path) -> dict:
    """The checkpoint at ``path``, checked against ``cfg`` (``ValueError`` naming the flag): only
    ``epochs`` (not below those done; the rest re-anneal) and evaluation settings may change."""
    try:
        state = read_checkpoint(path, format=PINN_FORMAT, unversioned=True)
    except ValueError as err:  # not a checkpoint at all
        raise ValueError(f"--resume: {err}") from None
    saved, now = state["config"], asdict(cfg)
    changed = [k for k, v in now.items() if k not in _EVALUATION_ONLY | {"epochs"} and saved.get(k) != v]
    if changed:
        what = ", ".join(f"{_flag(k)} {now[k]} (checkpoint: {saved.get(k)})" for k in changed)
        raise ValueError(f"--resume: {what} differ from the checkpoint's run; resume with its settings")
    if cfg.epochs < int(state["epoch"]):
        raise ValueError(f"--epochs {cfg.epochs}: the checkpoint has already trained {state['epoch']} epochs")
    return state


# --------------------------------------------------------------------------- figures


def save_figures(ev: dict, history: dict, cfg: PDEConfig, out: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ext = [-1, 1, 0, cfg.T]
    lim = float(np.abs(ev["ref"]).max())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    for ax, key, title in ((axes[0], "pred", "PIDEQ prediction"), (axes[1], "ref", "reference")):
        im = ax.imshow(ev[key], origin="lower", extent=ext, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(title=title, xlabel="$x$", ylabel="$t$")
        fig.colorbar(im, ax=ax).set_label("$u(x, t)$")
    im = axes[2].imshow(np.abs(ev["pred"] - ev["ref"]), origin="lower", extent=ext, aspect="auto", cmap="magma")
    axes[2].set(title=f"|error| (rel. L2 {ev['rel_l2']:.2e})", xlabel="$x$", ylabel="$t$")
    fig.colorbar(im, ax=axes[2]).set_label("$|u_{pred} - u_{ref}|$")
    fig.suptitle(f"{cfg.problem}: ν = {cfg.nu:.4g}, {cfg.n_states} states")
    paths.append(out / f"{prefix}_solution.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for frac, color in zip((0.0, 0.25, 0.5, 0.75, 1.0), plt.cm.viridis(np.linspace(0, 0.9, 5))):
        i = int(round(frac * (len(ev["t"]) - 1)))
        ax.plot(ev["x"], ev["ref"][i], color=color, lw=2.5, alpha=0.45)
        ax.plot(ev["x"], ev["pred"][i], "--", color=color, lw=1.3, label=f"t = {ev['t'][i]:.2f}")
    ax.set(xlabel="$x$", ylabel="$u(x, t)$", title="slices: reference (thick, pale) vs PIDEQ (dashed)")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=8)
    paths.append(out / f"{prefix}_slices.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    from matplotlib.ticker import MaxNLocator

    styles = {"loss": dict(color="0.55", lw=3.5, alpha=0.5, zorder=1), "ic": dict(color="C1", ls=":", lw=1.5),
              "bc": dict(color="C2", ls="-.", lw=1.2), "pde": dict(color="C0", ls="--", lw=1.3)}
    for k in ("loss", "ic", "bc", "pde"):  # the total wide and pale beneath the terms, which it can equal
        ax.semilogy(history["epoch"], history[k], label="total" if k == "loss" else k, **styles[k])
    ax.set(xlabel="epoch", ylabel="loss term (mean square)", title=f"{cfg.problem}: training losses")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    paths.append(out / f"{prefix}_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return [str(p) for p in paths]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, problem: str = "burgers") -> None:
    """Flags of ``deqdiff pinn burgers`` (``problem="heat"`` for ``deqdiff pinn heat``)."""
    d = PDEConfig(problem=problem)
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose one of {sorted(PROBLEMS)}")
    a = parser.add_argument
    a("--epochs", type=int, default=d.epochs, help="full-batch Adam steps (fresh points each)")
    a("--out", default=f"runs/pinn_{problem}", help="output folder (figures, results.json, checkpoint.pt)")
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="cpu or cuda")
    a("--dtype", default=d.dtype, choices=("float32", "float64"))
    a("--nu", type=float, default=d.nu, help="viscosity / diffusivity ν (default 0.1/π)")
    a("--T", dest="T", type=float, default=d.T, help="time horizon")
    a("--states", dest="n_states", type=int, default=d.n_states, help="DEQ hidden states")
    a("--collocation", dest="n_collocation", type=int, default=d.n_collocation, help="collocation points per epoch")
    a("--initial-points", dest="n_initial", type=int, default=d.n_initial)
    a("--boundary-points", dest="n_boundary", type=int, default=d.n_boundary)
    a("--lr", type=float, default=d.lr)
    a("--lam-pde", type=float, default=d.lam_pde)
    a("--kappa", type=float, default=d.kappa, help="Jacobian regularization weight")
    a("--tol", type=float, default=d.tol, help="forward tolerance (relative residual)")
    a("--solver", default=d.solver, help="forward solver")
    a("--mode", default=d.mode, choices=MODES, help="implicit derivatives (deqdiff) or unrolled autodiff")
    a("--model", default=d.model, choices=MODELS, help="the DEQ, or the explicit MLP PINN baseline")
    a("--mlp-width", type=int, default=d.mlp_width)
    a("--mlp-depth", type=int, default=d.mlp_depth)
    a("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
      help="continue bit-identically from CHECKPOINT (default: OUT/checkpoint.pt); a larger --epochs "
           "extends the run (the learning rate re-anneals over the added epochs)")
    a("--checkpoint-every", type=int, default=100,
      help="also write OUT/checkpoint.pt every this many epochs (0: at the end only)")
    a("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(problem=problem)


def config_from_args(args: argparse.Namespace) -> PDEConfig:
    """The validated config of the parsed flags; a ``ValueError`` names the flag that is wrong."""
    fields = PDEConfig.__dataclass_fields__
    try:
        return PDEConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)}).validate()
    except ValueError as err:
        field = str(err).split(" ", 1)[0]  # validate()'s messages start with the setting's name
        if field in fields and hasattr(args, field):
            raise ValueError(f"{_flag(field)}: {err}") from None
        raise


def prepare(args: argparse.Namespace) -> tuple[PDEConfig, dict | None]:
    """The run's config and, with ``--resume``, the checked checkpoint; ``ValueError`` (naming
    the flag) or ``OSError`` for bad input, before any training."""
    cfg = config_from_args(args)
    if int(getattr(args, "checkpoint_every", 0)) < 0:
        raise ValueError(f"--checkpoint-every must be ≥ 0, got {args.checkpoint_every}")
    resume = getattr(args, "resume", None)
    if not resume:
        return cfg, None
    path = Path(args.out) / "checkpoint.pt" if resume is True else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return cfg, resume_state(cfg, path)


def execute(cfg: PDEConfig, args: argparse.Namespace, state: dict | None = None) -> int:
    """Train (from ``state`` if given), evaluate against the reference, write figures,
    ``results.json`` and ``checkpoint.pt`` (also every ``--checkpoint-every`` epochs)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    t0 = time.perf_counter()
    model, history, extras = train(cfg, progress=not args.no_progress, state=state, checkpoint_path=ckpt,
                                   checkpoint_every=int(getattr(args, "checkpoint_every", 0)))
    wall = time.perf_counter() - t0
    save_checkpoint(ckpt, checkpoint(model, history, extras, cfg), format=PINN_FORMAT)
    ev = evaluate(model, cfg)
    figs = save_figures(ev, history, cfg, out, cfg.problem)
    n_params = sum(p.numel() for p in model.parameters())
    epochs_run = cfg.epochs - (int(state["epoch"]) if state else 0)
    results = {"config": asdict(cfg), "rel_l2": ev["rel_l2"], "max_abs_error": ev["max_abs"],
               "final_loss": history["loss"][-1] if history["loss"] else None, "parameters": n_params,
               "train_wall_s": wall, "s_per_epoch": wall / max(epochs_run, 1), "figures": figs,
               "reference": "Cole–Hopf quadrature" if cfg.convection else "analytic heat solution",
               "history": history}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{cfg.problem}: relative L2 error {ev['rel_l2']:.3e} (max abs {ev['max_abs']:.3e}), "
          f"{n_params} parameters, {wall:.1f}s; results in {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``deqdiff pinn burgers|heat``: :func:`prepare` then :func:`execute`."""
    cfg, state = prepare(args)
    return execute(cfg, args, state)
