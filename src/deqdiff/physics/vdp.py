"""The Van der Pol experiment: ``ẏ₁ = y₂``, ``ẏ₂ = μ(1 − y₁²)y₂ − y₁``.

Two setups (``VdPConfig.setup``):

* ``"pideq"`` — the PIDEQ paper's setup (Pacheco & Camponogara 2022): ``y(t) = C z* + D t``, ``z* = tanh(A z* + a t + b)``
  (80 states), μ = 1, ``y(0) = (0, 0.1)``, ``t ∈ [0, 2]``; loss = IC loss + λ·physics residual at
  random collocation points (λ = 0.1) + κ·‖∂f/∂z‖_F (κ = 1, exact closed form); Anderson, tol 1e-4.
* ``"conditioned"`` (default) — a flow map over a short horizon ``Δ ∈ [0, h]`` (h = 0.1):
  ``y(Δ; y0, μ) = y0 + Δ·F(y0) + Δ²/2·(∂F/∂y F)(y0) + Δ³·PIDEQ(φ)`` (the exact second-order
  Taylor skip; the DEQ learns the remainder, docs/physics.md), trained by the physics residual
  alone at random ``(Δ, y0)`` (the IC holds by construction; residual weighted by
  ``(h/Δ)²/(‖y0/box‖ + 0.05)``), 500 Adam + 80 L-BFGS steps, checked on held-out initial states
  and rolled out (``y_{k+1} = y(h; y_k)``) to simulate ``t ∈ [0, 20]``; the same metrics for the
  skip alone are reported next to the model's (``skip_only_*``).
* ``"conditioned"`` with ``mu_range = (lo, hi)`` — the parametric family: one flow map for every
  μ ∈ [lo, hi], μ drawn uniformly per collocation point like the state (the model takes μ as a
  conditioning input, normalized to [−1, 1] over the range); the box defaults to the extent of
  the μ = hi limit cycle (+8 %). Evaluated per μ on held-out values inside the range and on two
  just outside it (labelled extrapolation) by :mod:`deqdiff.physics.vdp_family`.

Errors against ``solve_ivp`` (DOP853, rtol 1e-11): IAE and relative L2
(:mod:`deqdiff.physics.metrics`). ``run(config, out_dir)`` trains (with checkpoint/resume),
evaluates, plots and writes ``results.json``; it returns the results dict.

Resuming (:func:`resume_state`) continues bit-identically when the settings are unchanged. It
may also lengthen the run: more ``lbfgs_steps`` (or fewer, down to those already taken) change
nothing that was done; a different ``epochs`` while still in the Adam phase decays the learning
rate exponentially from its current value to ``lr_final`` over the remaining Adam epochs. Any
other change (physics, model, the Adam schedule once L-BFGS began) is refused, naming the flag.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .losses import PhysicsLoss
from .metrics import iae, relative_l2
from .models import MLP, PIDEQ, FlowMap, count_parameters
from .problems import reference_flow, reference_trajectory, van_der_pol
from .rollout import rollout
from ..training.checkpoint import PINN_FORMAT, read_checkpoint
from .training import Phase, Trainer

__all__ = ["VdPConfig", "SETUPS", "build_model", "build_trainer", "evaluate", "resume_state", "run", "family_box",
           "sample_family"]

SETUPS = ("pideq", "conditioned")


@dataclass
class VdPConfig:
    setup: str = "conditioned"
    model: str = "pideq"  # core: "pideq" (implicit DEQ), "unrolled" (same, unrolled autodiff), "mlp"
    mu: float = 1.0  # ignored when mu_range is set
    mu_range: tuple[float, float] | None = None  # conditioned: train over μ ~ U[lo, hi] (the family)
    width: int = 64
    mlp_depth: int = 4
    epochs: int = 500  # one epoch = one fresh batch of collocation points, one optimizer step
    batch: int = 256
    lr: float = 3e-3
    lr_final: float = 3e-5  # exponential decay from lr to lr_final over the Adam epochs
    lbfgs_steps: int = 80  # L-BFGS finishing phase (fresh batch per step, 20 inner iterations)
    physics_weight: float = 1.0
    ic_weight: float = 1.0
    jacobian_weight: float = 0.0
    max_norm: float | None = None  # ‖A‖_F ≤ ρ: contraction by construction, but caps every singular value
    spectral_norm: float | None = 0.95  # σ̂(A) ≤ ρ by cached power iteration (None: free A, rely on κ)
    solver: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 100
    # the PIDEQ paper's setup
    y0: tuple[float, float] = (0.0, 0.1)
    t_end: float = 2.0
    # conditioned setup
    horizon: float = 0.1
    box: tuple[float, float] = (2.2, 2.9)  # training/held-out y0 ∈ [-b1, b1] × [-b2, b2]
    taylor: int = 2  # conditioned: exact Taylor skip of this order (0, 1, 2), the net times Δ^(order+1)
    taylor_features: bool = True  # conditioned: feed the core asinh of the skip's derivatives too
    normalize_residual: bool = True  # conditioned: residual × (h/Δ)^taylor (Δ ≥ 0.1h)
    state_floor: float = 0.05  # conditioned: residual ÷ (‖y0/box‖ + floor) (0: off)
    n_test: int = 64
    rollout_t_end: float = 20.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def for_setup(cls, setup: str, **overrides) -> "VdPConfig":
        """Defaults of a setup (``"pideq"``: the PIDEQ paper's), then ``overrides``."""
        if setup not in SETUPS:
            raise ValueError(f"unknown setup {setup!r}; choose one of {SETUPS}")
        base = dict(setup=setup)
        if setup == "pideq":
            # the paper solved with Anderson (``solver="anderson"`` reproduces it); on this
            # well-contracting model plain iteration needs no more iterations per row and each
            # costs a fraction of Anderson's, so the setup takes the library's default
            base.update(width=80, epochs=2000, lbfgs_steps=0, batch=1000, lr=1e-3, lr_final=1e-4, physics_weight=0.1,
                        jacobian_weight=1.0, tol=1e-4, max_norm=None, spectral_norm=None, solver="auto")
        known = {f.name for f in fields(cls)}
        bad = set(overrides) - known
        if bad:
            raise ValueError(f"unknown config field(s): {sorted(bad)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base.get("mu_range") is not None:
            base["mu_range"] = _check_mu_range(base["mu_range"], setup)
            if overrides.get("box") is None:
                base["box"] = family_box(base["mu_range"])
        cfg = cls(**base)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.setup not in SETUPS:
            raise ValueError(f"unknown setup {self.setup!r}; choose one of {SETUPS}")
        if self.model not in ("pideq", "unrolled", "mlp"):
            raise ValueError(f"model must be 'pideq', 'unrolled' or 'mlp', got {self.model!r}")
        for name in ("horizon", "t_end", "rollout_t_end", "tol", "lr", "lr_final"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        for name in ("width", "batch", "n_test", "max_iter", "mlp_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_norm", "spectral_norm"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"{name} must be in (0, 1) or None, got {v}")
        for name in ("physics_weight", "ic_weight", "jacobian_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {v}")
        if not 0 <= int(self.seed) < 2 ** 63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not (math.isfinite(self.state_floor) and self.state_floor >= 0):
            raise ValueError(f"state_floor must be a finite number ≥ 0, got {self.state_floor}")
        for name in ("epochs", "lbfgs_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.mu_range is not None:
            _check_mu_range(self.mu_range, self.setup)
        vals = [self.mu, *self.y0, *self.box]
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"mu, y0 and box must be finite, got mu={self.mu}, y0={self.y0}, box={self.box}")
        if min(self.box) <= 0:
            raise ValueError(f"box half-widths must be positive, got {self.box}")
        if int(self.taylor) not in (0, 1, 2) or int(self.taylor) != self.taylor:
            raise ValueError(f"taylor (order of the Taylor skip) must be 0, 1 or 2, got {self.taylor}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")


def _check_mu_range(mu_range, setup: str) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ``ValueError`` starting with ``mu_range`` when it is not
    ``0 ≤ lo < hi`` (finite) or the setup is not ``conditioned``."""
    try:
        lo, hi = (float(v) for v in mu_range)
    except (TypeError, ValueError):
        raise ValueError(f"mu_range must be two numbers LO HI, got {mu_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"mu_range must satisfy 0 <= LO < HI (finite), got {lo:g} {hi:g}")
    if setup != "conditioned":
        raise ValueError(f"mu_range needs --setup conditioned (the family is a flow map conditioned on μ), got {setup!r}")
    return lo, hi


def family_box(mu_range: tuple[float, float], margin: float = 1.08) -> tuple[float, float]:
    """Half-widths of the training/held-out box of initial states for μ ∈ ``mu_range``: the
    extent of the largest μ's limit cycle (it grows with μ) times ``margin``, rounded up to 0.1
    (μ = 1 gives the single-μ default (2.2, 2.9); μ = 2 gives (2.2, 4.2))."""
    from .problems import limit_cycle_extent

    ext = limit_cycle_extent(max(mu_range))
    return tuple(math.ceil(10 * margin * e - 1e-9) / 10 for e in ext)


# --- model, loss, data ------------------------------------------------------------------------
def build_model(cfg: VdPConfig) -> torch.nn.Module:
    d_in = 1 if cfg.setup == "pideq" else 4  # t, or [Δ, y0₁, y0₂, μ]
    if cfg.setup != "pideq" and cfg.taylor_features:
        d_in += 2 * int(cfg.taylor)  # asinh of F(y0) and (∂F/∂y F)(y0)
    if cfg.model == "mlp":
        core = MLP(d_in, 2, cfg.width, cfg.mlp_depth)
    else:
        # the unrolled baseline records the same solver's loop (Anderson: PIDEQ's own approach)
        core = PIDEQ(d_in, 2, cfg.width, mode="unrolled" if cfg.model == "unrolled" else "implicit",
                     solver=cfg.solver, unrolled_solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter,
                     max_norm=cfg.max_norm, spectral_norm=cfg.spectral_norm)
    if cfg.setup == "pideq":
        return core
    if cfg.mu_range is not None:  # μ feature in [−1, 1] over the family's range
        lo, hi = cfg.mu_range
        center, scale = (lo + hi) / 2, (hi - lo) / 2
    else:
        center, scale = cfg.mu, max(abs(cfg.mu), 1.0)
    return FlowMap(core, 2, 1, horizon=cfg.horizon, state_scale=cfg.box, cond_center=center,
                   cond_scale=scale, rhs=_vdp_rhs if int(cfg.taylor) else None,
                   order=int(cfg.taylor), taylor_features=cfg.taylor_features)


def _vdp_rhs(t, y, mu):
    return van_der_pol(t, y, mu)


def build_loss(cfg: VdPConfig) -> PhysicsLoss:
    if cfg.setup == "pideq":
        return PhysicsLoss(lambda t, y: van_der_pol(t, y, cfg.mu), physics_weight=cfg.physics_weight,
                           ic_weight=cfg.ic_weight, jacobian_weight=cfg.jacobian_weight)
    order, h, floor = int(cfg.taylor), cfg.horizon, cfg.state_floor
    box = torch.tensor(cfg.box)

    def weight(x):
        w = x.new_ones(x.shape[0])
        if order and cfg.normalize_residual:
            # The Taylor skip makes the residual O(Δ^order): divide by (Δ/h)^order so that every
            # offset counts; the floor 0.1·h keeps float32 cancellation noise at tiny Δ bounded.
            w = w * (h / torch.clamp(x[:, 0], min=0.1 * h)) ** order
        if floor > 0:
            # The remainder scales like ‖y0‖ near the unstable origin, where a long rollout
            # starts: weigh residuals relative to the state's size so small states are fitted
            # as accurately (relatively) as large ones.
            w = w / (torch.linalg.vector_norm(x[:, 1:3] / box.to(x), dim=1) + floor)
        return w
    return PhysicsLoss(_vdp_rhs, rhs_args=lambda x: x[:, 3], physics_weight=cfg.physics_weight,
                       ic_weight=0.0, jacobian_weight=cfg.jacobian_weight, residual_weight=weight)


def _dtype(cfg: VdPConfig) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def build_trainer(cfg: VdPConfig) -> Trainer:
    """Model + loss + sampler + phases (Adam with exponential LR decay, then optional L-BFGS)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    dtype, device = _dtype(cfg), torch.device(cfg.device)
    model = build_model(cfg).to(device=device, dtype=dtype)
    loss = build_loss(cfg)
    ic = (torch.zeros(1, 1, dtype=dtype, device=device), torch.tensor([cfg.y0], dtype=dtype, device=device))

    def sample(gen: torch.Generator, step: int):
        if cfg.setup == "pideq":
            return (torch.rand(cfg.batch, 1, generator=gen, dtype=dtype) * cfg.t_end).to(device)
        if cfg.mu_range is not None:
            return sample_family(cfg, gen, dtype).to(device)
        u = torch.rand(cfg.batch, 3, generator=gen, dtype=dtype)
        box = torch.tensor(cfg.box, dtype=dtype)
        x = torch.cat([u[:, :1] * cfg.horizon, (2 * u[:, 1:] - 1) * box, torch.full((cfg.batch, 1), cfg.mu, dtype=dtype)], 1)
        return x.to(device)

    def loss_fn(model, batch, gen):
        return loss(model, batch, ic=ic if cfg.setup == "pideq" else None, generator=gen)

    gamma = (cfg.lr_final / cfg.lr) ** (1.0 / max(cfg.epochs, 1))
    phases = [Phase("adam", cfg.epochs, lambda p: torch.optim.Adam(p, lr=cfg.lr),
                    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma))]
    if cfg.lbfgs_steps:
        phases.append(Phase("lbfgs", cfg.lbfgs_steps, lambda p: torch.optim.LBFGS(
            p, lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")))
    return Trainer(model, loss_fn, sample, phases, seed=cfg.seed)


def sample_family(cfg: VdPConfig, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One batch of collocation points ``[Δ, y0₁, y0₂, μ]`` ``(batch, 4)`` for the μ family:
    ``Δ ~ U[0, h]``, ``y0 ~ U(box)``, ``μ ~ U[lo, hi]``, independently per point."""
    lo, hi = cfg.mu_range
    u = torch.rand(cfg.batch, 4, generator=gen, dtype=dtype)
    box = torch.tensor(cfg.box, dtype=dtype)
    return torch.cat([u[:, :1] * cfg.horizon, (2 * u[:, 1:3] - 1) * box, lo + (hi - lo) * u[:, 3:]], 1)


# --- evaluation -------------------------------------------------------------------------------
def _predict(model, x: np.ndarray) -> np.ndarray:
    p = next(iter(model.parameters()))
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=p.dtype, device=p.device)).cpu().numpy()


def held_out_states(cfg: VdPConfig) -> np.ndarray:
    """``n_test`` initial states drawn uniformly from the box with a seed disjoint from training's."""
    rng = np.random.default_rng(10_000 + cfg.seed)
    return rng.uniform(-1, 1, size=(cfg.n_test, 2)) * np.asarray(cfg.box)


def evaluate(cfg: VdPConfig, model: torch.nn.Module) -> dict:
    model.eval()
    if cfg.mu_range is not None:
        from .vdp_family import evaluate_family
        return evaluate_family(cfg, model)
    if cfg.setup == "pideq":
        t = np.linspace(0, cfg.t_end, 201)
        ref = reference_trajectory(cfg.y0, t, cfg.mu)
        pred = _predict(model, t[:, None])
        return {"t": t, "pred": pred, "ref": ref, "metrics": {
            "rel_l2": relative_l2(pred, ref), "iae": iae(pred, ref, t),
            "max_abs_error": float(np.abs(pred - ref).max())}}
    dts = np.linspace(0, cfg.horizon, 21)
    y0s = held_out_states(cfg)
    ref = reference_flow(y0s, dts, cfg.mu)  # (K, T, 2)
    x = np.concatenate([np.broadcast_to(dts[None, :, None], (len(y0s), len(dts), 1)),
                        np.broadcast_to(y0s[:, None, :], (len(y0s), len(dts), 2)),
                        np.full((len(y0s), len(dts), 1), cfg.mu)], 2).reshape(-1, 4)
    pred = _predict(model, x).reshape(ref.shape)
    inc_p, inc_r = pred - y0s[:, None], ref - y0s[:, None]
    t_roll, y_roll = rollout(model, cfg.y0, cfg.rollout_t_end, cond=(cfg.mu,))
    ref_roll = reference_trajectory(cfg.y0, t_roll, cfg.mu)
    iaes = [iae(p, r, dts) for p, r in zip(pred, ref)]
    metrics = {
        "held_out_rel_l2": relative_l2(pred, ref),
        "held_out_increment_rel_l2": relative_l2(inc_p, inc_r),
        "held_out_iae_mean": float(np.mean(iaes)),
        "held_out_max_abs_error": float(np.abs(pred - ref).max()),
        "rollout_rel_l2": relative_l2(y_roll, ref_roll),
        "rollout_iae": iae(y_roll, ref_roll, t_roll),
        "rollout_max_abs_error": float(np.abs(y_roll - ref_roll).max()),
    }
    if getattr(model, "order", 0) > 0:
        # The same numbers for the exact Taylor skip alone (core ≡ 0): what the network adds.
        skip = _SkipOnly(model)
        sk = _predict(skip, x).reshape(ref.shape)
        _, y_sk = rollout(skip, cfg.y0, cfg.rollout_t_end, cond=(cfg.mu,))
        metrics.update({
            "skip_only_held_out_rel_l2": relative_l2(sk, ref),
            "skip_only_rollout_rel_l2": relative_l2(y_sk, ref_roll),
            # error of the learned remainder y − Taylor relative to the true remainder
            "held_out_remainder_rel_l2": relative_l2(pred - sk, ref - sk),
        })
    ev = {"dts": dts, "y0s": y0s, "pred": pred, "ref": ref, "t": t_roll, "roll": y_roll, "ref_roll": ref_roll,
          "metrics": metrics}
    if getattr(model, "order", 0) > 0:
        ev["roll_skip"] = y_sk
    return ev


class _SkipOnly(torch.nn.Module):
    """A flow map's exact Taylor polynomial alone (its network replaced by 0), for comparison."""

    def __init__(self, flow_map):
        super().__init__()
        self.fm, self.horizon = flow_map, flow_map.horizon
        self.dummy = torch.nn.Parameter(next(flow_map.parameters()).detach()[:0].clone())

    def forward(self, x):
        return self.fm.skip(x)


def _history_stats(history: list[dict]) -> dict:
    times = np.array([h["time"] for h in history]) if history else np.zeros(0)
    cpu = np.array([h.get("cpu_time", np.nan) for h in history]) if history else np.zeros(0)
    out = {"epochs": len(history), "epoch_time_mean_s": float(times.mean()) if times.size else None,
           "epoch_cpu_time_mean_s": float(cpu.mean()) if cpu.size else None, "train_cpu_time_s": float(cpu.sum()),
           "epoch_time_median_s": float(np.median(times)) if times.size else None,
           "train_time_s": float(times.sum()),
           "skipped_steps": sum(bool(h.get("skipped")) for h in history)}  # non-finite gradients
    if history and "iters_mean" in history[0]:
        it = np.array([h["iters_mean"] for h in history])
        out.update(solver_iters_mean=float(it.mean()), solver_iters_last=float(it[-1]),
                   solver_iters_max=float(max(h["iters_max"] for h in history)))
    if history:
        out["final_loss"] = {k: v for k, v in history[-1].items() if isinstance(v, float) and k not in ("time", "cpu_time", "lr")}
    return out


#: settings a resumed run may change freely: they only affect the evaluation or the device
_EVALUATION_ONLY = frozenset({"n_test", "rollout_t_end", "device"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_state(cfg: VdPConfig, path: str | Path) -> dict:
    """The checkpoint at ``path``, checked against ``cfg``: ``ValueError`` naming the flag when
    the run cannot continue under ``cfg`` (see the module docstring)."""
    try:
        state = read_checkpoint(path, format=PINN_FORMAT, unversioned=True)
    except ValueError as err:  # not a checkpoint at all
        raise ValueError(f"--resume: {err}") from None
    saved = state.get("config")
    step, adam = int(state["step"]), cfg.epochs
    if saved is None:  # written before checkpoints kept their config: the phases must agree
        return state
    now = asdict(cfg)
    changed = [k for k, v in now.items() if k not in _EVALUATION_ONLY | {"epochs", "lbfgs_steps"}
               and json.dumps(saved.get(k)) != json.dumps(v)]
    if "mu_range" in changed and "box" in changed:  # the box follows from the range: name the flag only
        changed.remove("box")
    if changed:
        what = ", ".join(f"{_flag(k)} {now[k]} (checkpoint: {saved.get(k)})" for k in changed)
        raise ValueError(f"--resume: {what} differ from the checkpoint's run; resume with its settings")
    old_adam = int(saved["epochs"])
    if step > old_adam:  # in the L-BFGS phase: the Adam schedule is history
        if adam != old_adam:
            raise ValueError(f"--epochs {adam}: the checkpoint is past its {old_adam} Adam epochs (L-BFGS step "
                             f"{step - old_adam}), so --epochs cannot change")
        if cfg.lbfgs_steps < step - old_adam:
            raise ValueError(f"--lbfgs-steps {cfg.lbfgs_steps}: the checkpoint has already taken "
                             f"{step - old_adam} L-BFGS steps")
    elif adam < step:
        raise ValueError(f"--epochs {adam}: the checkpoint has already taken {step} Adam epochs")
    return state


def _reanneal(trainer: Trainer, cfg: VdPConfig) -> None:
    """A run resumed with another ``epochs`` in its Adam phase: decay exponentially from the
    current learning rate to ``lr_final`` over the Adam epochs that remain."""
    remaining = cfg.epochs - trainer.step_count
    if remaining <= 0 or trainer.phases[trainer.phase_index].name != "adam":
        return
    opt = trainer.optimizer
    for group in opt.param_groups:
        group.pop("initial_lr", None)  # the new schedule starts from the current rate
    lr_now = opt.param_groups[0]["lr"]
    trainer.scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, (cfg.lr_final / lr_now) ** (1.0 / remaining))


def run(cfg: VdPConfig, out_dir: str | Path, *, resume: bool | str | Path | dict = False, progress: bool = True,
        plots: bool = True, checkpoint_every: int = 250) -> dict:
    """Train (``resume``: from ``out_dir/checkpoint.pt`` if True, a checkpoint path, or a state
    from :func:`resume_state`), evaluate, plot, write JSON. Checkpoints go to
    ``out_dir/checkpoint.pt`` every ``checkpoint_every`` epochs and at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg)
    ckpt = out / "checkpoint.pt"
    if resume is not False and resume is not None:
        state = resume if isinstance(resume, dict) else resume_state(cfg, ckpt if resume is True else resume)
        trainer.load_state_dict(state)
        if state.get("config") is not None and int(state["config"]["epochs"]) != cfg.epochs:
            _reanneal(trainer, cfg)
    t0 = time.perf_counter()
    trainer.run(progress=progress, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                checkpoint_extra={"config": asdict(cfg)}, desc=f"vdp/{cfg.setup}")
    wall = time.perf_counter() - t0
    ev = evaluate(cfg, trainer.model)
    results = {"problem": "vdp" if cfg.mu_range is None else "vdp-family", "config": asdict(cfg),
               "parameters": count_parameters(trainer.model),
               "metrics": ev["metrics"], "training": _history_stats(trainer.history),
               "wall_time_this_run_s": wall, "torch_threads": torch.get_num_threads(), "files": {}}
    if cfg.mu_range is not None:
        results["reference"] = "scipy.integrate.solve_ivp (DOP853, rtol 1e-11, atol 1e-12)"
        results["per_mu"] = ev["per_mu_metrics"]
    if plots:
        if cfg.mu_range is not None:
            from .vdp_family import plot_family as plot
        else:
            from .plots import plot_vdp as plot
        results["files"] = {k: str(v) for k, v in plot(cfg, ev, trainer.history, out).items()}
    results["files"]["checkpoint"] = str(ckpt)
    with open(out / "results.json", "w") as fh:
        json.dump(results, fh, indent=2, default=float)
    results["files"]["results"] = str(out / "results.json")
    return results
