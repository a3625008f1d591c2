"""Empirical neural tangent kernel of DEQ models and the linear-rate bound of Nguyen 2022, ch. 3.

* Θ(x, x') = J_θ y(x) J_θ y(x')ᵀ (Nguyen 2022 §2.6, eq. 3.7's K for a scalar output) with the
  per-sample Jacobians J_θ y(x) ∈ R^{C×P} taken by ``torch.func.jacrev`` through the model,
  vmapped over samples. Through the DEQ, every row of J is the engine's implicit adjoint solve
  (I − ∂f/∂z)ᵀ w = ∂y/∂z* at z* (Pacheco 2023, eq. deq-backward-fixed-point), never an unrolled
  backpropagation through solver iterations.
* λ₀ = σ_min(Z(0)), Z = [z*(x₁) … z*(x_N)] ∈ R^{n×N} (Theorem 3.3.1). For a scalar output
  ŷ = uᵀz*, the u-block of the kernel is ZᵀZ, so λ_min(Θ) ≥ σ_min(Z)² when n ≥ N (eq. 3.14).
* :func:`linear_rate_check`: full-batch gradient descent on L = ½‖ŷ − y‖² (eq. 3.4) compared
  with the bounds L(k) ≤ (1 − ηλ₀²/4)^k L(0) (Theorem 3.3.5, eq. 3.20) and
  L(t) ≤ exp(−λ₀² t/2) L(0) at t = ηk (Theorem 3.3.1), with the theorem's conditions
  (3.16)–(3.18) and its step-size condition evaluated where the model exposes (A, B, U, u).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ._common import capture_equilibrium, param_dict, preserve_parameters, standard_strides

__all__ = ["per_sample_jacobian", "empirical_ntk", "ntk_spectrum", "equilibrium_matrix", "lambda_0",
           "ntk_summary", "linear_rate_check", "thesis_conditions"]


def per_sample_jacobian(model: nn.Module, x: Tensor, *, params: Sequence[str] | None = None,
                        chunk_size: int = 32, progress: Callable | None = None, **overrides) -> Tensor:
    """``J (S, C, P)``: the Jacobian of each sample's output (flattened to C entries) w.r.t. the
    parameters ``params`` (names; default all trainable), concatenated in ``named_parameters``
    order. ``overrides`` go to ``model(x, **overrides)`` (e.g. a tight ``tol``)."""
    p = param_dict(model, params)
    x = standard_strides(x)

    def fy(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),), overrides).reshape(-1)

    jac = vmap(jacrev(fy), in_dims=(None, 0))
    blocks = []
    starts = range(0, x.shape[0], chunk_size)
    with preserve_parameters(model):
        for s in (progress(starts) if progress else starts):
            J = jac(p, x[s:s + chunk_size])
            blocks.append(torch.cat([J[n].reshape(*J[n].shape[:2], -1) for n in p], dim=-1).detach())
    return torch.cat(blocks)


def empirical_ntk(model: nn.Module, x: Tensor, x2: Tensor | None = None, *, mode: str = "full",
                  jacobians: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
    """The empirical NTK.

    ``mode="full"``: ``(S·C, S'·C)`` with rows ordered (sample, output) —
    Θ[(i,c),(j,d)] = ∂y_c(x_i)/∂θ · ∂y_d(x'_j)/∂θ. ``mode="trace"``: ``(S, S')``, Σ_c of the
    diagonal output blocks. ``kwargs`` go to :func:`per_sample_jacobian`."""
    if mode not in ("full", "trace"):
        raise ValueError(f"mode must be 'full' or 'trace', got {mode!r}")
    if jacobians is None:
        J1 = per_sample_jacobian(model, x, **kwargs)
        J2 = J1 if x2 is None else per_sample_jacobian(model, x2, **kwargs)
    else:
        J1, J2 = jacobians
    if mode == "trace":
        return torch.einsum("acp,bcp->ab", J1, J2)
    S1, C, P = J1.shape
    return J1.reshape(S1 * C, P) @ J2.reshape(-1, P).T


def ntk_spectrum(K: Tensor) -> Tensor:
    """Eigenvalues of the (symmetrized) kernel, descending."""
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"the kernel must be a square matrix, got shape {tuple(K.shape)}")
    return torch.linalg.eigvalsh(0.5 * (K + K.T)).flip(0)


def equilibrium_matrix(model: nn.Module, x: Tensor, **overrides) -> Tensor:
    """``Z (n, S)``: the equilibria z*(x_i) (flattened) as columns (Nguyen 2022 eq. 3.6)."""
    with torch.no_grad():
        z = capture_equilibrium(model, x, **overrides).z_star
    return z.reshape(z.shape[0], -1).T.detach()


def lambda_0(Z: Tensor) -> float:
    """σ_min(Z) of Theorem 3.3.1 for ``Z (n, N)``; 0 when n < N (ZᵀZ is then singular; the
    theorem needs width n ≥ N) or when Z is numerically rank deficient (σ_min ≤ σ_max·max(n, N)·ε
    in Z's dtype)."""
    n, N = Z.shape
    if n < N:
        return 0.0
    sv = torch.linalg.svdvals(Z.double())
    # below the numerical-rank threshold σ_min is round-off: Z is rank deficient (e.g. dead ReLUs)
    if sv[-1] <= sv[0] * max(n, N) * torch.finfo(Z.dtype).eps:
        return 0.0
    return float(sv[-1])


def ntk_summary(K: Tensor, *, top: int = 20) -> dict:
    """Numbers of a kernel: λ_max, λ_min, condition number, trace, symmetry error, top eigenvalues."""
    ev = ntk_spectrum(K.double())
    lmin, lmax = float(ev[-1]), float(ev[0])
    return {
        "size": int(K.shape[0]), "lambda_max": lmax, "lambda_min": lmin,
        "condition": lmax / lmin if lmin > 0 else math.inf, "trace": float(K.double().trace()),
        "symmetry_error": float((K - K.T).abs().max() / K.abs().max().clamp_min(1e-300)),
        "top_eigenvalues": ev[:top].tolist(), "spectrum": ev.tolist(),
    }


# --- the linear-rate bound of Nguyen 2022 ch. 3 -------------------------------------------------

def _scalar_output(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    if y.ndim > 1 and y[0].numel() != 1:
        raise ValueError(f"the linear-rate check needs a scalar output per sample (ŷ = uᵀz*), got shape {tuple(y.shape)}")
    return y.reshape(-1)


def thesis_conditions(parts0: Mapping[str, Tensor], radii: Mapping[str, float], *, m: float, X: Tensor,
                      loss0: float, lam0: float, lr: float) -> dict:
    """Condition 2 (3.16)–(3.18) and the step-size condition of Theorem 3.3.5, with
    λ̄_a = ‖a(0)‖₂ + R_a for a ∈ {A, B, U, u} (``parts0`` the initial tensors, ``radii`` the R_a;
    m the monotonicity margin, X ``(N, d)`` the inputs, L(0), λ₀ and η)."""
    norm2 = {k: float(torch.linalg.matrix_norm(v.double().reshape(v.shape[0], -1) if v.ndim > 1 else v.double()[None], 2))
             for k, v in parts0.items()}
    lb = {k: norm2[k] + float(radii[k]) for k in ("A", "B", "U", "u")}
    R = {k: max(float(radii[k]), 1e-300) for k in ("A", "B", "U", "u")}
    xf = float(X.double().norm())
    s = math.sqrt(2 * loss0)
    lUuA, lUu, lu, lU = lb["U"] * lb["u"] * lb["A"], lb["U"] * lb["u"], lb["u"], lb["U"]
    c316 = 8 * xf * s * max(2 * lUuA / (m**2 * R["A"]), 2 * lUu / (m**2 * R["B"]), lu / (m * R["U"]), lU / (m * R["u"]))
    c317 = 8 * xf**2 * s * lu * (1 + 6 * (lb["U"] * lb["A"]) ** 2 + 4 * lU**2)
    c318 = 20 * xf**2 * (lu**2 + 4 * lUuA**2 + 4 * lUu**2 + lU**2)
    eta_max = min(4 / lam0**2 if lam0 > 0 else math.inf,
                  1 / (xf**2 * (lu**2 + 4 * lUu**2 + 4 * lUuA**2 + lU**2)),
                  0.5 / (xf * lam0 * lUuA) if lam0 > 0 else math.inf,
                  1 / (6 * lam0**2 * (lb["u"] * lb["A"]) ** 2) if lam0 > 0 else math.inf)
    conds = {
        "3.16": {"lhs": lam0**2, "rhs": c316, "holds": lam0**2 >= c316},
        "3.17": {"lhs": lam0**3, "rhs": c317, "holds": lam0**3 >= c317},
        "3.18": {"lhs": lam0**2, "rhs": c318, "holds": lam0**2 >= c318},
        "step_size": {"lhs": lr, "rhs": eta_max, "holds": lr <= eta_max},
    }
    return {"conditions": conds, "all_hold": all(c["holds"] for c in conds.values()), "lambda_bar": lb,
            "radii": {k: float(v) for k, v in radii.items()}, "norms_at_init": norm2, "X_fro": xf}


def linear_rate_check(model: nn.Module, X: Tensor, y: Tensor, *, lr: float, steps: int,
                      parts: Callable[[nn.Module], Mapping[str, Tensor]] | None = None, m: float | None = None,
                      progress: Callable | None = None) -> dict:
    """Train ``model`` (scalar output, e.g. a monotone DEQ with one output) by full-batch gradient
    descent θ ← θ − η∇L on L = ½‖ŷ − y‖² and compare the loss with the bounds of
    Theorems 3.3.5/3.3.1 built from λ₀ = σ_min(Z(0)).

    ``parts(model)`` (optional) returns the tensors of Nguyen 2022 (ch. 3) ``{"A", "B", "U", "u"}`` so that
    condition 2 and the step-size condition are evaluated a posteriori (radii R_a = the largest
    Frobenius distance ‖a(k) − a(0)‖ reached by the run; ``m`` the monotonicity margin).
    Returns losses, bounds, σ_min(Z(k)), whether the bound held and whether the conditions held
    (the bound is a theorem only when they do; the report says which)."""
    Z0 = equilibrium_matrix(model, X)
    lam0 = lambda_0(Z0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    p0 = {k: v.detach().clone() for k, v in parts(model).items()} if parts else None
    radii = {k: 0.0 for k in ("A", "B", "U", "u")}
    losses, sig = [], []
    it = range(steps + 1)
    for k in (progress(it) if progress else it):
        cap = capture_equilibrium(model, X)
        yhat = cap.output.reshape(-1)
        if yhat.shape != y.shape:
            raise ValueError(f"the linear-rate check needs a scalar output per sample; got {tuple(cap.output.shape)}")
        loss = 0.5 * (yhat - y).square().sum()
        losses.append(float(loss.detach()))
        Zk = cap.z_star.detach().reshape(X.shape[0], -1).T
        sig.append(lambda_0(Zk))
        if p0 is not None:
            for key, v in parts(model).items():
                radii[key] = max(radii[key], float((v.detach() - p0[key]).norm()))
        if k == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    L0 = losses[0]
    ks = torch.arange(steps + 1, dtype=torch.float64)
    rate = 1 - lr * lam0**2 / 4
    disc = (L0 * rate**ks).tolist() if rate > 0 else [L0] + [0.0] * steps
    cont = (L0 * torch.exp(-lam0**2 * lr * ks / 2)).tolist()
    holds = all(l <= b * (1 + 1e-9) + 1e-300 for l, b in zip(losses, disc))
    out = {
        "lambda_0": lam0, "width": int(Z0.shape[0]), "num_samples": int(Z0.shape[1]), "lr": lr, "steps": steps,
        "loss": losses, "bound_discrete": disc, "bound_continuous": cont, "sigma_min_Z": sig,
        "bound_holds": holds, "hypothesis_sigma_half": all(s >= lam0 / 2 for s in sig),
        "width_at_least_N": Z0.shape[0] >= Z0.shape[1],
        "empirical_rate": (losses[-1] / L0) ** (1 / steps) if L0 > 0 and losses[-1] > 0 else 0.0,
        "bound_rate": rate,
    }
    if parts is not None:
        if m is None:
            raise ValueError("m (the monotonicity margin) is needed to evaluate the theorem's conditions")
        out["theorem"] = thesis_conditions(p0, radii, m=m, X=X.reshape(X.shape[0], -1), loss0=L0, lam0=lam0, lr=lr)
    else:
        out["theorem"] = {"all_hold": None, "note": "conditions not evaluated: no (A, B, U, u) accessor given"}
    return out
