"""Neural deep equilibrium solvers (Bai, Koltun & Kolter 2022, "Neural deep equilibrium solvers", ICLR).

A fitted solver has two small networks, trained on a frozen DEQ (:mod:`deqdiff.solvers.neural_fit`):

* the **initializer** ``z⁰ = g_φ(x)`` proposes the starting state from the input injection ``x``:
  a small network fitted by gradient steps (:class:`Initializer`), or kernel ridge regression of
  z* on x (:class:`KernelInitializer`: one linear solve, no gradient steps);
* the **HyperAnderson** network proposes, at each of the first ``mixer_steps`` steps (those it
  was fitted on; later steps are plain Anderson) or at every step (``mixer_steps=None``, the
  paper's use; the fit keeps whichever needs fewer f-evaluations on held-out fitting samples),
  the Anderson weights and the mixing ``β_k`` of each sample from its (compressed) residual
  history. Here it predicts a
  *correction* to the least-squares weights of Anderson acceleration, so the untrained network is
  Anderson itself and the paper's regularization toward the least-squares weights is the size of
  the correction;
* optionally, **learned steps** (:class:`LearnedSteps`) between the two: the first steps move z by
  a ridge map of the residual fitted to the error left after a plain step (a learned Newton-like
  step, one f-evaluation each), then the Anderson loop continues.

All act only on the forward solve: the state the solve returns still satisfies
``‖f(z) − z‖ ≤ atol + tol·‖f(z)‖`` and every derivative of z* is an implicit solve at z*, so
derivatives do not depend on the solver that found z*.

The steps run in the library's Anderson loop (:func:`deqdiff.solvers.anderson.anderson`) through
its ``mixer`` hook. Each sample falls back to plain Anderson (least-squares weights, β = 1) once
the network's proposals stop reducing its residual for ``patience`` steps in a row, or once they
are not finite; the solve then issues a :class:`FallbackWarning` naming how many samples did.

Use: ``fixed_point(f, ns.initial_state(x), x, *θ, solver="neural", network=ns)``, or for a
``deqdiff.DEQ`` layer ``with ns.attached(model.deq): model(inputs)`` (the layer then starts from
``g_φ(x)`` and solves with this network). ``ns.save(path)`` / ``NeuralSolver.load(path)`` round-trip
the fitted solver (configuration and weights).
"""

from __future__ import annotations

import math
import struct
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .anderson import anderson
from .base import SolveInfo, register_solver, row_norm, stopping_bound

__all__ = ["NeuralSolverConfig", "NeuralSolver", "Initializer", "KernelInitializer", "HyperAnderson", "LearnedSteps",
           "FallbackWarning", "neural_solver", "fit_learned_steps", "FORMAT", "INITIALIZERS"]

#: initializer kinds: a network fitted by gradient steps, or kernel ridge regression (closed form)
INITIALIZERS = ("network", "kernel")

FORMAT = "deqdiff-neural-solver/1"

#: a step "reduces the residual" when it brings the sample's best residual down by this share
MIN_DECREASE = 0.01


class FallbackWarning(RuntimeWarning):
    """Some samples of a neural solve were finished by plain Anderson acceleration."""


@dataclass
class NeuralSolverConfig:
    """Shapes and sizes of a neural solver.

    ``state_shape``/``input_shape``: per-sample shapes of the DEQ state z and of the injection x.
    ``m``: Anderson memory (history columns the mixer sees). ``hidden``: width of the mixer's
    MLP; ``compress``: dimension of the learned residual compression; ``init_hidden``: width
    (vector states; default 1024) or channels (image states; default 32) of the initializer;
    ``init_rank``: rank of the image initializer's global linear correction (0: none);
    ``state_layout``: ``(C_i, H_i, W_i)`` branch shapes of a flat multiscale state (MDEQ), which
    then gets the image initializer too. ``beta_max``: β ∈ (0, beta_max)
    (1 at initialization). ``mixer_steps``: the mixer proposes the first this many steps (the
    unrolled steps it was fitted on; later steps are plain Anderson, where the network would
    extrapolate beyond its training); None: every step; 0: never (plain Anderson from the
    initializer's start). ``patience``: steps in a row that fail to lower a sample's best
    residual by :data:`MIN_DECREASE` before it falls back to plain Anderson. ``initializer``:
    ``"network"`` (:class:`Initializer`) or ``"kernel"`` (:class:`KernelInitializer`, with
    ``kernel_centers`` fitting samples as centers and inputs projected on their ``kernel_rank``
    leading principal directions). ``reset_after``: samples still running after this many
    f-evaluations restart from the zero state (the default start of the library's DEQ layers) with
    plain Anderson steps for the iterations left (None: never; see :func:`neural_solver`), when at
    least ``reset_need`` iterations are left (None: always). ``learned_steps``: steps of
    :class:`LearnedSteps` (each on ``step_samples`` training residuals) before the Anderson loop."""

    state_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    m: int = 5
    hidden: int = 64
    compress: int = 8
    init_hidden: int | None = None
    beta_max: float = 2.0
    patience: int = 3
    mixer_steps: int | None = None  # steps the mixer acts on (those it was fitted on); None: all
    state_layout: tuple[tuple[int, int, int], ...] | None = None  # branches of a flat multiscale state
    init_rank: int = 32  # rank of the convolutional initializer's global linear correction (0: none)
    initializer: str = "network"  # "network" (gradient-fitted) or "kernel" (kernel ridge regression)
    kernel_centers: int | None = None  # kernel initializer: number of centers (its fitting samples)
    kernel_rank: int = 64  # kernel initializer: principal directions of the flattened input kept
    reset_after: int | None = None  # f-evaluations after which running samples restart from zero
    reset_need: int | None = None  # ... only when at least this many iterations are left
    learned_steps: int = 0  # learned residual-correction steps before Anderson (LearnedSteps)
    step_samples: int | None = None  # ... the number of training residuals each step's map holds
    meta: dict = field(default_factory=dict)  # provenance (model kind, fit settings), JSON-able

    def __post_init__(self):
        self.state_shape, self.input_shape = tuple(int(n) for n in self.state_shape), tuple(int(n) for n in self.input_shape)
        for name in ("m", "hidden", "compress", "init_hidden", "patience", "mixer_steps"):
            v = getattr(self, name)
            if v is None and name in ("init_hidden", "mixer_steps"):
                continue
            low = 0 if name == "mixer_steps" else 1
            if isinstance(v, bool) or int(v) != v or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
        if isinstance(self.learned_steps, bool) or int(self.learned_steps) != self.learned_steps or self.learned_steps < 0:
            raise ValueError(f"learned_steps must be an integer >= 0, got {self.learned_steps!r}")
        if self.learned_steps and self.step_samples is None:
            raise ValueError("learned steps need step_samples (the number of training residuals of each step's map)")
        for name in ("kernel_centers", "kernel_rank", "reset_after", "reset_need", "step_samples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.initializer == "kernel" and self.kernel_centers is None:
            raise ValueError("the kernel initializer needs kernel_centers (the number of its fitting samples)")
        if isinstance(self.init_rank, bool) or int(self.init_rank) != self.init_rank or self.init_rank < 0:
            raise ValueError(f"init_rank must be an integer >= 0, got {self.init_rank!r}")
        if self.state_layout is not None:
            self.state_layout = tuple(tuple(int(n) for n in b) for b in self.state_layout)
            if (not self.state_layout or any(len(b) != 3 or min(b) < 1 for b in self.state_layout)
                    or sum(math.prod(b) for b in self.state_layout) != math.prod(self.state_shape)):
                raise ValueError(f"state_layout must be (C, H, W) branch shapes whose sizes add up to the state's "
                                 f"{math.prod(self.state_shape)} unknowns, got {self.state_layout!r}")
        if not (math.isfinite(self.beta_max) and self.beta_max > 1):
            raise ValueError(f"beta_max must be a finite number > 1, got {self.beta_max!r}")
        if not self.state_shape or not self.input_shape or min(self.state_shape + self.input_shape) < 1:
            raise ValueError(f"state_shape and input_shape must be non-empty positive shapes, got "
                             f"{self.state_shape}, {self.input_shape}")

    @property
    def state_size(self) -> int:
        return math.prod(self.state_shape)


class Initializer(nn.Module):
    """``z⁰ = g_φ(x)``: per-sample injection ``(B, *input_shape)`` → state ``(B, *state_shape)``.

    Image injections ``(C_in, H, W)`` whose state is an image of the same spatial size, or a flat
    multiscale state with branches ``layout`` ``[(C_i, H/s_i, W/s_i)]`` (MDEQ), get the paper's kind of
    initializer for vision DEQs (Bai, Koltun & Kolter 2022: a small network on the injection with
    the state's spatial structure): a convolutional trunk (3×3 convolutions with dilations 1, 2, 4
    and ReLUs, ``hidden`` channels), per branch an average pooling by s_i and a 1×1 convolution,
    plus a global linear correction of rank ``rank`` (flattened injection → r → flattened state:
    every pixel of z* depends on the whole image through the DEQ's repeated convolutions). Other
    shapes get one wide tanh layer on the standardized flattened input. The heads are linear in
    the output: :meth:`refit_output` sets them by least squares."""

    def __init__(self, input_shape: tuple[int, ...], state_shape: tuple[int, ...], hidden: int | None = None,
                 layout: tuple[tuple[int, int, int], ...] | None = None, rank: int = 0):
        super().__init__()
        self.input_shape, self.state_shape = tuple(input_shape), tuple(state_shape)
        if layout is None and len(state_shape) == 3:
            layout = (tuple(state_shape),)
        self.layout = tuple(tuple(b) for b in layout) if layout is not None else None
        self.conv = (len(input_shape) == 3 and self.layout is not None
                     and all(input_shape[1] % b[1] == 0 and input_shape[2] % b[2] == 0
                             and input_shape[1] // b[1] == input_shape[2] // b[2] for b in self.layout))
        hidden = hidden or (32 if self.conv else 1024)
        n_in, n = math.prod(input_shape), math.prod(state_shape)
        if self.conv:
            c_in = input_shape[0]
            # dilations 1, 2, 4: a 15×15 receptive field
            self.net = nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
                                     nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4), nn.ReLU())
            self.pools = [input_shape[1] // b[1] for b in self.layout]
            self.heads = nn.ModuleList(nn.Conv2d(hidden, b[0], 1) for b in self.layout)
            self.rank = int(rank)
            if self.rank:
                self.down = nn.Linear(n_in, self.rank, bias=False)
                self.up = nn.Linear(self.rank, n, bias=False)
                nn.init.zeros_(self.up.weight)  # starts as the convolutional part alone
        else:
            self.rank = 0
            self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n))
            # standardized inputs times N(0, 1) weights: random tanh features that are nonlinear from
            # the start (PyTorch's default keeps them nearly linear), whose least-squares output layer
            # is already a good initializer (random features; measured on the Van der Pol DEQ: 1024
            # features give 0.3 % held-out error, a second tanh layer of 256 gave 2.8 %)
            nn.init.normal_(self.net[0].weight, 0.0, 1.0)
            nn.init.normal_(self.net[0].bias, 0.0, 1.0)
        # per-feature (MLP) or per-channel (conv) standardization of x, set from the fitting data
        n_stats = input_shape[0] if self.conv else math.prod(input_shape)
        self.register_buffer("x_mean", torch.zeros(n_stats))
        self.register_buffer("x_std", torch.ones(n_stats))

    @torch.no_grad()
    def set_input_stats(self, x: Tensor) -> None:
        """Standardize inputs by the mean and standard deviation of ``x`` (the fitting inputs)."""
        flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if self.conv else x.reshape(x.shape[0], -1)
        self.x_mean.copy_(flat.mean(0).to(self.x_mean))
        self.x_std.copy_(flat.std(0).clamp_min(1e-6).to(self.x_std) if flat.shape[0] > 1 else torch.ones_like(self.x_std))

    def _standardized(self, x: Tensor) -> Tensor:
        h = x.to(self.x_mean.dtype)
        if self.conv:
            return (h - self.x_mean[:, None, None]) / self.x_std[:, None, None]
        return (h.reshape(h.shape[0], -1) - self.x_mean) / self.x_std

    def _branch_features(self, h: Tensor) -> list[Tensor]:
        return [h if s == 1 else nn.functional.avg_pool2d(h, s) for s in self.pools]

    def _global(self, xs: Tensor) -> Tensor:
        return self.up(self.down(xs.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        xs = self._standardized(x)
        if not self.conv:
            out = self.net(xs)
        else:
            h = self.net(xs)
            out = torch.cat([head(f).flatten(1) for head, f in zip(self.heads, self._branch_features(h))], 1)
            if self.rank:
                out = out + self._global(xs)
        return out.reshape(x.shape[0], *self.state_shape).to(x.dtype)

    @torch.no_grad()
    def refit_output(self, x: Tensor, z: Tensor, ridge: float = 1e-6, chunk: int = 1024) -> None:
        """Set the output layer (the last linear layer, or each branch's 1×1 convolution, fitted to
        ``z`` minus the global correction) to the ridge least-squares fit of the targets ``z`` on
        the hidden features of ``x`` — the output weights are linear in the output, so their best
        value has a closed form (variable projection); the gradient steps then only have to move
        the hidden layers. ``ridge`` is relative to the mean feature energy."""
        lasts = list(self.heads) if self.conv else [self.net[-1]]
        grams: list = [None] * len(lasts)
        crosses: list = [None] * len(lasts)
        for i in range(0, x.shape[0], chunk):
            xs, zs = self._standardized(x[i:i + chunk]), z[i:i + chunk].reshape(min(chunk, x.shape[0] - i), -1)
            if self.conv:  # a 1×1 convolution is one linear map per pixel
                if self.rank:
                    zs = zs - self._global(xs).to(zs.dtype)
                feats = self._branch_features(self.net(xs))
                parts = zs.split([math.prod(b) for b in self.layout], 1)
                pairs = [(f.movedim(1, -1).reshape(-1, f.shape[1]),
                          t.reshape(t.shape[0], *b).movedim(1, -1).reshape(-1, b[0]))
                         for f, t, b in zip(feats, parts, self.layout)]
            else:
                pairs = [(self.net[:-1](xs), zs)]
            for j, (h, t) in enumerate(pairs):
                h = torch.cat([h, torch.ones_like(h[:, :1])], 1).double()
                t = t.double()
                grams[j] = h.T @ h if grams[j] is None else grams[j] + h.T @ h
                crosses[j] = h.T @ t if crosses[j] is None else crosses[j] + h.T @ t
        for last, gram, cross in zip(lasts, grams, crosses):
            lam = ridge * float(gram.diagonal().mean())
            w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross)
            last.weight.copy_(w[:-1].T.reshape(last.weight.shape).to(last.weight.dtype))
            last.bias.copy_(w[-1].to(last.bias.dtype))


class KernelInitializer(nn.Module):
    """``z⁰ = g(x)`` by kernel ridge regression (Saunders, Gammerman & Vovk 1998, "Ridge regression
    learning algorithm in dual variables", ICML) of the fixed points on the injections:
    ``g(x) = Σ_i a_i k(x, x_i) + z̄`` with the Gaussian kernel ``k(x, x') = exp(−‖P(x − x')‖²/s)``,
    where P projects the flattened injection on the ``rank`` leading principal directions of the
    ``centers`` fitting injections x_i (randomized SVD, Halko, Martinsson & Tropp 2011) and the
    coefficients solve ``(K + λI) a = z* − z̄`` — one linear solve, no gradient steps. The
    bandwidth s (a multiple of the median squared distance between centers) and λ are chosen on a
    held-out fifth of the samples by a local search on the grids :attr:`WIDTHS` × :attr:`RIDGES`
    from (1, 1e-2) (:meth:`fit`), the held-out error computed in the dtype the initializer
    predicts in.

    Input ``(B, *input_shape)`` → ``(B, *state_shape)``; the fitted values live in buffers, so a
    checkpoint round-trips them (their sizes come from ``centers`` and ``rank``)."""

    # bandwidth s as multiples of the median squared distance (down to 1/64: the PIDEQ of KdV, whose
    # fixed points vary sharply with the coordinates, chose 1/32; up to 64: the deblurring DEQ, whose
    # fixed points are nearly linear in the measurements, chose 16–64)
    WIDTHS = (0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    RIDGES = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # λ (the kernel matrix has unit diagonal)

    def __init__(self, input_shape: tuple[int, ...], state_shape: tuple[int, ...], centers: int, rank: int = 64):
        super().__init__()
        self.input_shape, self.state_shape = tuple(input_shape), tuple(state_shape)
        n_in, n = math.prod(input_shape), math.prod(state_shape)
        self.rank = max(1, min(int(rank), n_in, int(centers)))
        self.register_buffer("x_mean", torch.zeros(n_in))
        self.register_buffer("proj", torch.zeros(n_in, self.rank))
        self.register_buffer("centers", torch.zeros(int(centers), self.rank))
        self.register_buffer("coef", torch.zeros(int(centers), n))
        self.register_buffer("z_mean", torch.zeros(n))
        self.register_buffer("bandwidth", torch.ones(()))
        self.fit_info: dict = {}

    def _project(self, x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1).to(self.proj.dtype) - self.x_mean) @ self.proj

    @staticmethod
    def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
        return (a.square().sum(1, keepdim=True) - 2.0 * a @ b.T + b.square().sum(1)).clamp_min(0.0)

    @classmethod
    def _kernel(cls, a: Tensor, b: Tensor, s: Tensor | float) -> Tensor:
        return torch.exp(-cls._sq_dist(a, b) / s)

    def forward(self, x: Tensor) -> Tensor:
        k = self._kernel(self._project(x), self.centers, self.bandwidth)
        return (k @ self.coef + self.z_mean).reshape(x.shape[0], *self.state_shape).to(x.dtype)

    @torch.no_grad()
    def fit(self, x: Tensor, z: Tensor, generator: torch.Generator | None = None, *,
            leave_one_out: bool = False) -> dict:
        """Fit to the fixed points ``z`` ``(n, *state_shape)`` of the injections ``x``
        ``(n, *input_shape)``, n = the ``centers`` given at construction (``ValueError``
        otherwise). Computed in float64, stored in the buffers' dtype. Returns the chosen width
        and λ and the held-out mean ‖g(x) − z*‖/‖z*‖ of each pair (also in ``fit_info``), the
        held-out predictions computed as :meth:`forward` will compute them, in the buffers'
        dtype: a small λ gives large coefficients of alternating sign whose sum float32 cannot
        resolve (measured on a float32 PIDEQ: λ = 1e-10, held-out error 6e-6 in float64 but a
        start residual of 0.39 in float32), so such a pair is not chosen where it would fail.
        ``leave_one_out``: also set ``loo_predictions`` ``(n, N)`` (float64), the prediction for
        each fitting sample by the fit on all others (closed form: ``z*_i − a_i / [(K + λI)⁻¹]_ii``),
        the training starts :func:`fit_learned_steps` needs."""
        n = self.centers.shape[0]
        if x.shape[0] != n or z.shape[0] != n:
            raise ValueError(f"the kernel initializer has {n} centers; got {x.shape[0]} inputs and {z.shape[0]} targets")
        X, Z = x.reshape(n, -1).double(), z.reshape(n, -1).double()
        mu = X.mean(0)
        q = min(self.rank + 8, *X.shape)
        with torch.random.fork_rng(devices=[]):  # the randomized SVD draws; the caller's RNG untouched
            torch.manual_seed(0 if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            _, _, V = torch.svd_lowrank(X - mu, q=q, niter=2)
        P = torch.zeros(X.shape[1], self.rank, dtype=X.dtype)
        P[:, :min(self.rank, V.shape[1])] = V[:, :self.rank]
        A = (X - mu) @ P
        z_mean = Z.mean(0)
        T = Z - z_mean
        d2 = (A.square().sum(1, keepdim=True) - 2.0 * A @ A.T + A.square().sum(1)).clamp_min(0.0)
        med = float(d2[~torch.eye(n, dtype=torch.bool)].median()) if n > 1 else 1.0
        med = med if med > 0 else 1.0
        errors: dict[tuple[float, float], float] = {}
        perm = torch.randperm(n, generator=generator)
        cut = max(1, int(0.8 * n))
        fit_idx, val_idx = perm[:cut], perm[cut:]
        if val_idx.numel():
            zn = torch.linalg.vector_norm(Z[val_idx], dim=1).clamp_min(torch.finfo(Z.dtype).tiny)
            d2f = d2[fit_idx][:, fit_idx]
            dt = self.coef.dtype  # the held-out predictions in the dtype forward() computes them in
            A_dt = A.to(dt)
            d2v = self._sq_dist(A_dt[val_idx], A_dt[fit_idx])
            z_mean_dt = z_mean.to(dt)

            def error(i: int, j: int) -> float:
                key = (self.WIDTHS[i], self.RIDGES[j])
                if key not in errors:
                    s = key[0] * med
                    a = _ridge_solve(torch.exp(-d2f / s), T[fit_idx], key[1])
                    pred = (torch.exp(-d2v / s) @ a.to(dt) + z_mean_dt).double()
                    err = torch.linalg.vector_norm(pred - Z[val_idx], dim=1) / zn
                    errors[key] = float(err.mean()) if bool(torch.isfinite(err).all()) else math.inf
                return errors[key]

            best = (self.WIDTHS.index(1.0), self.RIDGES.index(1e-2))
            while True:  # local search: move to the best neighbour on the grid while it improves
                i, j = best
                near = [(i + di, j + dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                        if 0 <= i + di < len(self.WIDTHS) and 0 <= j + dj < len(self.RIDGES)]
                step = min(near, key=lambda ij: error(*ij))
                if error(*step) >= error(i, j):
                    break
                best = step
            w, lam = self.WIDTHS[best[0]], self.RIDGES[best[1]]
        else:
            w, lam = 1.0, 1e-2
        finite = {k: e for k, e in errors.items() if math.isfinite(e)}
        K = torch.exp(-d2 / (w * med))
        if leave_one_out:
            coef, diag = _ridge_solve(K, T, lam, inverse_diagonal=True)
            self.loo_predictions = Z - coef / diag[:, None]
        else:
            coef = _ridge_solve(K, T, lam)
        for buf, val in ((self.x_mean, mu), (self.proj, P), (self.centers, A), (self.coef, coef),
                         (self.z_mean, z_mean), (self.bandwidth, torch.tensor(w * med))):
            buf.copy_(val.to(buf))
        self.fit_info = {"width": w, "ridge": lam, "median_sq_distance": med,
                         "held_out_error": finite.get((w, lam), math.nan),
                         "errors": {f"{k[0]:g}/{k[1]:g}": e for k, e in errors.items()}}
        return self.fit_info


class LearnedSteps(nn.Module):
    """Learned residual-correction steps ``z ← z + r + Σ_i ⟨r, r_i⟩ c_i``, r = f(z) − z: per step,
    kernel ridge regression with the linear kernel (Saunders, Gammerman & Vovk 1998) of the error
    left after a plain fixed-point step, ``z* − z − r``, on the residual r, fitted on the
    residuals ``r_i`` of training starts — a learned approximation of the Newton step
    ``(I − ∂f/∂z)⁻¹ r`` around the data's fixed points, where a plain step only removes the
    fast-contracting part of the error (:func:`fit_learned_steps`). Each step costs one
    f-evaluation (of ``f(z)``), counted by :func:`neural_solver` like an iteration.

    ``steps`` maps over ``samples`` training residuals of ``size`` unknowns; ``step(k, r)``
    ``(B, size)`` → the update ``(B, size)``. The fitted values live in buffers (a checkpoint
    round-trips them)."""

    def __init__(self, steps: int, samples: int, size: int):
        super().__init__()
        self.register_buffer("residuals", torch.zeros(int(steps), int(samples), int(size)))
        self.register_buffer("coef", torch.zeros(int(steps), int(samples), int(size)))

    @property
    def steps(self) -> int:
        return int(self.residuals.shape[0])

    def step(self, k: int, r: Tensor) -> Tensor:
        rr = r.to(self.coef.dtype)
        return (rr + (rr @ self.residuals[k].T) @ self.coef[k]).to(r.dtype)


#: ridge μ of the learned steps, relative to the mean squared residual norm
STEP_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@torch.no_grad()
def fit_learned_steps(g: Callable[[Tensor], Tensor], z0: Tensor, z_star: Tensor, steps: int,
                      chunk: int = 1024) -> tuple[LearnedSteps, dict]:
    """Fit ``steps`` :class:`LearnedSteps` maps on training starts ``z0`` ``(n, N)`` (held-out
    predictions of the initializer, e.g. its leave-one-out predictions) whose fixed points of
    the flat map ``g`` are ``z_star`` ``(n, N)`` (``g`` with ``row_subsets``: evaluated in
    chunks of ``chunk`` rows). Step k's map is fitted on the residuals at the
    starts after k steps, each start moved by the leave-one-out prediction of the maps before it
    (closed form, so the next map trains on starts as good as unseen inputs get); its ridge μ is
    the one of :data:`STEP_RIDGES` with the least leave-one-out error (one eigendecomposition of
    the residuals' Gram matrix serves every μ). Steps are kept while the learned step's
    leave-one-out error is below that of a plain fixed-point step (the step the Anderson loop
    takes first): the first that is not ends the fit. Returns the module of the kept steps
    (buffers cast to ``z0``'s dtype) and per step tried the chosen μ, the mean relative errors
    ‖z* − z‖/‖z*‖ at the start, after a plain fixed-point step and after the learned step, and
    whether it was kept."""
    n, N = z0.shape
    Z = z_star.reshape(n, -1).double()
    zn = torch.linalg.vector_norm(Z, dim=1).clamp_min(torch.finfo(Z.dtype).tiny)
    z = z0.double()
    mod = LearnedSteps(steps, n, N)
    info = []
    for k in range(steps):
        if getattr(g, "row_subsets", False):  # in chunks of rows (g(z_rows, rows=idx))
            fz = torch.cat([g(z[i:i + chunk].to(z0.dtype), rows=torch.arange(i, min(i + chunk, n), device=z0.device))
                            for i in range(0, n, chunk)])
        else:
            fz = g(z.to(z0.dtype))
        r = fz.double() - z
        T = Z - z - r  # the error a plain step leaves
        G = r @ r.T
        s = float(G.diagonal().mean()) or 1.0
        lam, U = torch.linalg.eigh(G)  # once for every μ: (G + μ s I)⁻¹ = U diag(1/(λ + μ s)) Uᵀ
        lam = lam.clamp_min(0.0)
        UT, U2 = U.T @ T, U.square()
        best = None
        for mu in STEP_RIDGES:
            inv = 1.0 / (lam + mu * s)
            a = U @ (inv[:, None] * UT)
            loo = T - a / (U2 @ inv)[:, None]  # leave-one-out predictions of T (closed form)
            err = float((torch.linalg.vector_norm(T - loo, dim=1) / zn).mean())
            if math.isfinite(err) and (best is None or err < best[0]):
                best = (err, mu, a, loo)
        if best is None:
            raise ValueError("learned steps: no finite fit (non-finite residuals at the training starts)")
        err, mu, a, loo = best
        plain = float((torch.linalg.vector_norm(T, dim=1) / zn).mean())
        info.append({"ridge": mu, "error_start": float((torch.linalg.vector_norm(Z - z, dim=1) / zn).mean()),
                     "error_plain_step": plain, "error_learned_step": err, "kept": err < plain})
        if not err < plain:  # no better than the plain step the Anderson loop takes anyway: stop here
            break
        mod.residuals[k] = r
        mod.coef[k] = a
        z = z + r + loo
    kept = sum(st["kept"] for st in info)
    out = LearnedSteps(kept, n, N)
    out.residuals.copy_(mod.residuals[:kept])
    out.coef.copy_(mod.coef[:kept])
    return out.to(z0.dtype), {"steps": info, "kept": kept}


def _ridge_solve(K: Tensor, T: Tensor, lam: float, inverse_diagonal: bool = False):
    """``(K + λI)⁻¹ T`` for a positive semi-definite ``K`` (Cholesky; LU if that fails); with
    ``inverse_diagonal`` also the diagonal of ``(K + λI)⁻¹`` from the same factorization (the
    closed-form leave-one-out predictions need it): ``(coef, diagonal)``."""
    M = K + lam * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        coef = torch.cholesky_solve(T, L)
        return (coef, torch.cholesky_inverse(L).diagonal()) if inverse_diagonal else coef
    coef = torch.linalg.solve(M, T)
    return (coef, torch.linalg.inv(M).diagonal()) if inverse_diagonal else coef


def _slog(v: Tensor) -> Tensor:
    """Signed logarithm: keeps sign and order, compresses the many decades residual ratios span."""
    return torch.sign(v) * torch.log1p(v.abs())


class HyperAnderson(nn.Module):
    """Per-sample Anderson weights and mixing from the residual history (HyperAnderson, Bai,
    Koltun & Kolter 2022).

    Inputs per sample at step k, in chronological order and right-aligned in ``m`` slots (empty
    slots masked): the Gram matrix ΔFᵀΔF and ΔFᵀF_k of the residual differences divided by
    ‖F_k‖² (scale-free), the least-squares weights γ, the last residual decrease ‖F_{k−1}‖/‖F_k‖,
    and a learned compression ``P F_k/‖F_k‖`` (``compress`` numbers) of the current residual.
    Outputs: a correction δγ to γ (``m`` slots) and the mixing β = beta_max·sigmoid(ℓ); the last
    layer starts at zero, so the untrained network is Anderson with β = 1."""

    def __init__(self, state_size: int, m: int, hidden: int = 64, compress: int = 8, beta_max: float = 2.0):
        super().__init__()
        self.m, self.beta_max = m, float(beta_max)
        self.compress = nn.Linear(state_size, compress, bias=False)
        nn.init.normal_(self.compress.weight, 0.0, 1.0)  # acts on unit vectors: O(1) features
        n_in = m * m + 3 * m + 2 + compress
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, m + 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.beta_offset = math.log(1.0 / (self.beta_max - 1.0))  # sigmoid(0 + offset)·beta_max = 1

    def forward(self, F: Tensor, res: Tensor, gram: Tensor, rhs: Tensor, gamma: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``F`` ``(S, N)``, ``res`` = ‖F‖ ``(S,)``, ``gram`` ``(S, m_k, m_k)``, ``rhs`` ``(S, m_k)``
        and ``gamma`` ``(S, m_k)`` in chronological order (oldest first); returns δγ ``(S, m_k)``
        and β ``(S,)`` in the state's dtype."""
        S, mk = gamma.shape
        m = self.m
        dt = self.net[0].weight.dtype
        r2 = (res * res).clamp_min(torch.finfo(res.dtype).tiny)
        G = F.new_zeros(S, m, m)
        G[:, m - mk:, m - mk:] = gram / r2[:, None, None]
        b = F.new_zeros(S, m)
        b[:, m - mk:] = rhs / r2[:, None]
        g = F.new_zeros(S, m)
        g[:, m - mk:] = gamma
        mask = F.new_zeros(S, m)
        mask[:, m - mk:] = 1.0
        if mk:  # ‖F_{k−1}‖² = ‖F_k − ΔF_newest‖²
            prev = (1.0 - 2.0 * b[:, -1] + G[:, -1, -1]).clamp_min(0.0)
            decrease = 0.5 * torch.log(prev.clamp_min(1e-30))
        else:
            decrease = F.new_zeros(S)
        unit = F / res.clamp_min(torch.finfo(res.dtype).tiny)[:, None]
        feats = torch.cat([_slog(G.reshape(S, m * m)), _slog(b), _slog(g), mask,
                           decrease[:, None].clamp(-30, 30), F.new_full((S, 1), min(k, 30) / 30.0),
                           self.compress(unit.to(dt)).to(F.dtype)], 1)
        out = self.net(feats.to(dt)).to(F.dtype)
        dgamma = out[:, m - mk:m] if mk else out[:, :0]
        beta = self.beta_max * torch.sigmoid(out[:, m] + self.beta_offset)
        return dgamma, beta


def chronological(newest: int, mk: int, m: int) -> list[int]:
    """Ring-buffer columns of the Anderson history, oldest first (``newest`` is the latest)."""
    return [(newest - mk + 1 + j) % m for j in range(mk)]


def alpha_change(dgamma: Tensor) -> Tensor:
    """Change of the iterate weights α (over the m_k + 1 iterates, Σα = 1) caused by a change δγ
    of the difference weights (chronological): α = (γ₀, γ₁ − γ₀, …, 1 − γ_{m_k−1})."""
    pad = dgamma.new_zeros(dgamma.shape[0], 1)
    return torch.cat([dgamma, pad], 1) - torch.cat([pad, dgamma], 1)


class _Session:
    """One solve's mixer: calls the network, keeps per-sample fallback state in batch indexing,
    and (while fitting) records the α corrections for the regularization loss."""

    def __init__(self, network: "NeuralSolver", S: int, device, dtype, *, patience: int | None,
                 beta: float, record: bool):
        self.net, self.beta, self.patience = network.mixer, float(beta), patience
        self.steps = network.config.mixer_steps
        self.best = torch.full((S,), math.inf, dtype=dtype, device=device)
        self.tol, self.atol, self.scale = 0.0, 0.0, None  # the solve's stopping rule
        self.seen: Tensor | None = None  # ‖g(z)‖ of the rows of the latest evaluation
        self.strikes = torch.zeros(S, dtype=torch.long, device=device)
        self.fallen = torch.zeros(S, dtype=torch.bool, device=device)
        self.alpha_terms: list[Tensor] | None = [] if record else None

    def __call__(self, k, F, res, dF, gram, rhs, gamma, rows, newest):
        if self.steps is not None and k >= self.steps:  # past the fitted steps: plain Anderson
            return gamma, torch.full_like(res, self.beta)
        mk = gamma.shape[1]
        order = chronological(newest, mk, self.net.m)
        inv = [order.index(c) for c in range(mk)]  # chronological position of each ring column
        g_chron = gamma[:, order]
        dgamma, beta = self.net(F, res, gram[:, order][:, :, order], rhs[:, order], g_chron, k)
        if self.alpha_terms is not None and mk:
            self.alpha_terms.append(alpha_change(dgamma).pow(2).sum(1).mean())
        new = (g_chron + dgamma)[:, inv]
        if self.patience is None:
            return new, beta
        idx = slice(None) if rows is None else rows
        res_d = res.detach()
        # rows that met the stopping rule are frozen by the loop: they keep their residual
        # without failing (the rule as the loop's Tracker applies it, on the same ‖g(z)‖)
        sc = self.seen if self.scale is None else self.scale[idx]
        atol = self.atol[idx] if isinstance(self.atol, Tensor) else self.atol
        running = ~(torch.isfinite(res_d) & (res_d <= atol + self.tol * sc))
        improved = (res_d < (1.0 - MIN_DECREASE) * self.best[idx]) | ~running
        strikes = torch.where(improved, 0, self.strikes[idx] + 1)
        bad = ~(torch.isfinite(new).all(1) & torch.isfinite(beta)) & running
        fallen = self.fallen[idx] | (strikes >= self.patience) | bad
        self.best[idx] = torch.minimum(self.best[idx], res_d)
        self.strikes[idx] = strikes
        self.fallen[idx] = fallen
        new = torch.where(fallen[:, None], gamma, new)
        beta = torch.where(fallen, torch.full_like(beta, self.beta), beta)
        return new, beta


class NeuralSolver(nn.Module):
    """A fitted neural DEQ solver: :class:`Initializer` + :class:`HyperAnderson` (module docstring)."""

    def __init__(self, config: NeuralSolverConfig):
        super().__init__()
        self.config = config
        if config.initializer == "kernel":
            self.initializer = KernelInitializer(config.input_shape, config.state_shape, config.kernel_centers,
                                                 config.kernel_rank)
        else:
            self.initializer = Initializer(config.input_shape, config.state_shape, config.init_hidden,
                                           config.state_layout, config.init_rank)
        self.mixer = HyperAnderson(config.state_size, config.m, config.hidden, config.compress, config.beta_max)
        self.steps = (LearnedSteps(config.learned_steps, config.step_samples, config.state_size)
                      if config.learned_steps else None)

    @property
    def m(self) -> int:
        return self.config.m

    # -- use ---------------------------------------------------------------------------------
    def initial_state(self, x: Tensor, default: Tensor | Callable[[], Tensor] | None = None) -> Tensor:
        """``g_φ(x)`` ``(B, *state_shape)`` (no graph: z* does not depend on its start). Samples
        whose proposal is not finite start from ``default`` (a state, or a function returning
        one; zeros if None) with a :class:`FallbackWarning`. ``ValueError`` if ``x`` does not have
        the per-sample shape the network was fitted on."""
        if tuple(x.shape[1:]) != self.config.input_shape:
            raise ValueError(f"the neural solver was fitted on inputs of shape {self.config.input_shape} per sample, "
                             f"got {tuple(x.shape[1:])}")
        with torch.no_grad():
            z0 = self.initializer(x.detach())
        bad = ~torch.isfinite(z0.reshape(z0.shape[0], -1)).all(1)
        if bool(bad.any()):
            warnings.warn(f"neural solver: the initializer's proposal is not finite for {int(bad.sum())}/"
                          f"{bad.numel()} samples; they start from the default state", FallbackWarning, stacklevel=2)
            base = torch.zeros_like(z0) if default is None else (default() if callable(default) else default).to(z0)
            z0 = torch.where(bad.reshape(-1, *[1] * (z0.ndim - 1)), base, z0)
        return z0

    def solver_options(self) -> dict:
        """The ``fixed_point``/``DEQ`` options that solve with this network."""
        return {"solver": "neural", "network": self}

    @contextmanager
    def attached(self, deq: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``deq`` (a :class:`deqdiff.DEQ`) starts from ``g_φ(x)`` and solves
        with this network; its own start and options come back afterwards. Models that pass their
        solver at every call (the monotone DEQs) need ``model(x, **ns.solver_options())`` too."""
        old_init, old_opts = deq.z_init, dict(deq.solver_options)

        def z_init(x: Tensor) -> Tensor:
            def default() -> Tensor:  # the layer's own start, for samples the initializer fails on
                deq.z_init = old_init
                try:
                    return deq.init_state(x)
                finally:
                    deq.z_init = z_init
            return self.initial_state(x, default=default)

        deq.z_init = z_init
        deq.solver_options = {k: v for k, v in old_opts.items() if k not in ("m", "beta")} | self.solver_options()
        try:
            yield deq
        finally:
            deq.z_init, deq.solver_options = old_init, old_opts

    def session(self, z0: Tensor, *, patience: int | None, beta: float = 1.0, record: bool = False) -> _Session:
        return _Session(self, z0.shape[0], z0.device, z0.dtype, patience=patience, beta=beta, record=record)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write configuration and weights (atomically) to ``path``; ``extra``: plain metadata."""
        from ..training.checkpoint import save_checkpoint

        save_checkpoint(path, {"config": _plain(asdict(self.config)), "state": self.state_dict(),
                               "extra": _plain(extra or {})}, format=FORMAT)

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "NeuralSolver":
        """The solver saved at ``path`` (``FileNotFoundError``; ``ValueError`` if it is not one)."""
        from ..training.checkpoint import read_checkpoint

        path = Path(path)
        if path.is_dir():
            path = path / "neural_solver.pt"
        if not path.is_file():
            raise FileNotFoundError(f"neural solver not found: {path}")
        try:
            state = read_checkpoint(path, map_location, format=FORMAT)
        except struct.error as err:  # a truncated or foreign file torch.load cannot frame
            raise ValueError(f"{path} is not a readable deqdiff neural solver ({err})") from err
        cfg = dict(state["config"])
        cfg.setdefault("init_rank", 0)  # solvers saved before the global correction existed have none
        config = NeuralSolverConfig(**cfg)
        net = cls(config)
        dtype = next(iter(state["state"].values())).dtype
        net.to(dtype=dtype).load_state_dict(state["state"])
        net.extra = state.get("extra", {})
        return net.eval()


def _plain(obj):
    """Tuples to lists, recursively (checkpoints load with ``weights_only``)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@register_solver("neural")
def neural_solver(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
    network: NeuralSolver | None = None,
    patience: int | None = None,
    beta: float = 1.0,
    lam: float = 1e-8,
    restart: float | None = 1.0,
    max_restarts: int = 50,
    m: int | None = None,
    record_alpha: bool = False,
    reset_after: int | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Anderson acceleration whose weights and mixing come from a fitted :class:`NeuralSolver`
    ``network`` (required; its initializer is applied by the caller, see the module docstring).

    ``patience`` (default: the network's): non-improving steps after which a sample falls back to
    plain Anderson with mixing ``beta`` (0: never, as when fitting); ``lam``, ``restart``, ``max_restarts`` as in
    :func:`~deqdiff.solvers.anderson.anderson`; ``m`` must be None or the network's memory.
    ``info.extra["fallback_samples"]`` counts the samples that fell back (a
    :class:`FallbackWarning` says so). ``record_alpha`` (fitting) keeps the α corrections in
    ``info.extra["alpha_terms"]``.

    ``reset_after`` (default: the network's ``config.reset_after``; 0: never): samples still
    running after that many f-evaluations restart from the zero state with plain Anderson for
    the ``max_iter − reset_after`` iterations left (a learned start that leads a sample into a
    slow region is abandoned once the sample has used what a solve from the default start needs
    on average) — only when that leaves at least the network's ``config.reset_need`` iterations
    (the longest solve from the default start its fit saw), so a restart can finish. Their ``iterations`` count both passes (f-evaluations stay ≤ ``max_iter`` + 1);
    the residual trace is the first pass's; ``info.extra["reset_samples"]`` counts them.
    Not applied with ``store_trajectory`` or without a stopping rule (``tol = atol = 0``: a solve
    to a budget of iterations, where every sample is still running).

    A network with :class:`LearnedSteps` (``config.learned_steps``) takes those steps first, each
    one f-evaluation counted in ``iterations`` (a row that meets the rule during them stops there),
    then the Anderson loop continues from their result; ``info.extra["learned_steps"]`` says how
    many were taken (none with ``store_trajectory``)."""
    if not isinstance(network, NeuralSolver):
        raise ValueError("solver 'neural' needs a fitted deqdiff.solvers.neural.NeuralSolver as network= "
                         "(fit one with deqdiff.solvers.neural_fit.fit_neural_solver or `deqdiff fit-solver`)")
    if m is not None and int(m) != network.m:
        raise ValueError(f"solver 'neural': the network was fitted with Anderson memory m={network.m}, got m={m}")
    if tuple(z0.shape[1:]) != (network.config.state_size,):
        raise ValueError(f"solver 'neural': the network was fitted on states of {network.config.state_size} "
                         f"unknowns per sample, got {tuple(z0.shape[1:])}")
    patience = network.config.patience if patience is None else patience
    session = network.session(z0, patience=None if patience == 0 else patience, beta=beta, record=record_alpha)
    session.tol, session.atol, session.scale = tol, atol, scale

    def g_seen(z: Tensor, rows: Tensor | None = None) -> Tensor:
        out = g(z) if rows is None else g(z, rows=rows)
        session.seen = row_norm(out.detach())
        return out

    g_seen.row_subsets = getattr(g, "row_subsets", False)
    reset_after = network.config.reset_after if reset_after is None else (int(reset_after) or None)
    no_rule = tol == 0 and not bool(torch.as_tensor(atol).ne(0).any())
    need = network.config.reset_need or 0
    first_iter = (max_iter if reset_after is None or store_trajectory or no_rule or max_iter - reset_after < need
                  else reset_after - 1)
    n_steps = 0 if network.steps is None or store_trajectory else min(network.steps.steps, first_iter)
    start, done_at = z0, None
    if n_steps:
        start, done_at = _learned_steps(g, z0, network.steps, n_steps, tol=tol, atol=atol, scale=scale)
    z, info = anderson(g_seen, start, tol=tol, atol=atol, max_iter=first_iter - n_steps, scale=scale,
                       store_trajectory=store_trajectory, m=network.m, beta=beta, lam=lam, restart=restart,
                       max_restarts=max_restarts, mixer=session)
    if n_steps:  # count the steps' f-evaluations; rows that met the rule during them stop there
        done = done_at >= 0
        info = replace(info, iterations=torch.where(done, done_at, info.iterations + n_steps),
                       converged=info.converged | done)
    n_reset = 0
    if first_iter < max_iter and not bool(info.converged.all()):
        z, info, n_reset = _reset_stuck(g, z, info, tol=tol, atol=atol, scale=scale, max_iter=max_iter - reset_after,
                                        m=network.m, beta=beta, lam=lam, restart=restart, max_restarts=max_restarts,
                                        offset=reset_after)
    fallen = int(session.fallen.sum())
    extra = {**info.extra, "fallback_samples": fallen, "reset_samples": n_reset, "learned_steps": n_steps}
    if record_alpha:
        extra["alpha_terms"] = session.alpha_terms
    if fallen:
        warnings.warn(f"neural solver: the network's proposals stopped reducing the residual of {fallen}/"
                      f"{z0.shape[0]} samples; they were finished by plain Anderson", FallbackWarning, stacklevel=2)
    return z, replace(info, solver="neural", extra=extra)


def _learned_steps(g, z: Tensor, steps: LearnedSteps, n: int, *, tol: float, atol, scale: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """The first ``n`` steps of :func:`neural_solver` with a fitted :class:`LearnedSteps`: each
    evaluates f at the rows still running (one f-evaluation each), stops the rows whose residual
    meets the solve's rule ``‖f(z) − z‖ ≤ atol + tol·(scale or ‖f(z)‖)`` there, and moves the
    others by the learned update (a row whose update is not finite stays). Returns the states and
    per row the step at which it met the rule (−1: still running)."""
    done_at = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    subsets = getattr(g, "row_subsets", False)
    for k in range(n):
        run = (done_at < 0).nonzero().squeeze(1)
        if run.numel() == 0:
            break
        zr = z[run]
        with torch.no_grad():
            fz = g(zr, rows=run) if subsets else g(z)[run]
        r = fz - zr
        res = row_norm(r)
        sc = row_norm(fz) if scale is None else scale[run]
        row_atol = atol[run] if isinstance(atol, Tensor) and atol.ndim else atol
        ok = res <= stopping_bound(tol, row_atol, sc)
        done_at[run[ok]] = k
        update = steps.step(k, r)
        move = ~ok & torch.isfinite(update).all(1)
        z = z.index_copy(0, run[move], (zr + update)[move])
    return z, done_at


def _reset_stuck(g, z: Tensor, info: SolveInfo, *, tol: float, atol, scale: Tensor | None, max_iter: int,
                 offset: int, **anderson_options) -> tuple[Tensor, SolveInfo, int]:
    """Second pass of :func:`neural_solver`'s reset: the rows of ``z`` that did not converge
    restart from zero with plain Anderson (``max_iter`` iterations); their statistics replace the
    first pass's, their iterations counted after the first pass's ``offset`` f-evaluations."""
    idx = (~info.converged).nonzero().squeeze(1)
    start = z.new_zeros(idx.numel(), z.shape[1])
    row_atol = atol[idx] if isinstance(atol, Tensor) and atol.ndim else atol
    row_scale = None if scale is None else scale[idx]
    if getattr(g, "row_subsets", False):
        def g_rows(zz: Tensor, rows: Tensor | None = None) -> Tensor:
            return g(zz, rows=idx if rows is None else idx[rows])

        g_rows.row_subsets = True
        z2, info2 = anderson(g_rows, start, tol=tol, atol=row_atol, max_iter=max_iter, scale=row_scale,
                             **anderson_options)
    else:  # g evaluates whole batches: the converged rows are frozen at once (the stopping rule holds there)
        full = z.index_copy(0, idx, start)
        z_all, info_all = anderson(g, full, tol=tol, atol=atol, max_iter=max_iter, scale=scale, **anderson_options)
        z2 = z_all[idx]
        info2 = replace(info_all, iterations=info_all.iterations[idx], residual=info_all.residual[idx],
                        rel_residual=info_all.rel_residual[idx], converged=info_all.converged[idx])
    merged = replace(info, iterations=info.iterations.index_copy(0, idx, info2.iterations + offset),
                     residual=info.residual.index_copy(0, idx, info2.residual.to(info.residual)),
                     rel_residual=info.rel_residual.index_copy(0, idx, info2.rel_residual.to(info.rel_residual)),
                     converged=info.converged.index_copy(0, idx, info2.converged))
    return z.index_copy(0, idx, z2.to(z)), merged, int(idx.numel())
