import pytest
import torch

from deqdiff.analysis.ntk import (empirical_ntk, equilibrium_matrix, lambda_0, linear_rate_check, ntk_summary,
                                  per_sample_jacobian)
from tests.analysis.helpers import FCNet, MonNet


def dense_jacobian_reference(model: FCNet, X: torch.Tensor) -> torch.Tensor:
    """J (S, C, P) built explicitly: dz*/dθ = (I − ∂f/∂z)⁻¹ ∂f/∂θ with dense float64 matrices
    from torch.autograd.functional.jacobian of the cell at z* (no engine backward)."""
    from torch.autograd.functional import jacobian

    cell, head = model.deq.cell, model.head
    names = [n for n, _ in model.named_parameters()]
    cell_names = [n for n, _ in cell.named_parameters()]
    rows = []
    with torch.no_grad():
        Zs = model.deq(X)
    for i in range(X.shape[0]):
        x, z = X[i:i + 1], Zs[i:i + 1]
        with torch.no_grad():
            z = model.deq(x, tol=1e-14, max_iter=500)
        n = z.shape[1]
        Jz = jacobian(lambda z: cell(z, x), z).reshape(n, n)
        cell_p = dict(cell.named_parameters())
        blocks = {}
        for name in cell_names:
            def f_of(p, name=name):
                ps = {k: (p if k == name else v.detach()) for k, v in cell_p.items()}
                return torch.func.functional_call(cell, ps, (z, x))
            Jp = jacobian(f_of, cell_p[name].detach()).reshape(n, -1)
            dz = torch.linalg.solve(torch.eye(n) - Jz, Jp)  # (n, P_i)
            blocks["deq.cell." + name] = head.weight.detach() @ dz  # (C, P_i)
        C = head.weight.shape[0]
        blocks["head.weight"] = torch.kron(torch.eye(C), z.reshape(1, n))  # ∂(W z + b)_c/∂W_{c'j} = δ z_j
        blocks["head.bias"] = torch.eye(C)
        rows.append(torch.cat([blocks[k] for k in names], dim=1))
    return torch.stack(rows)


def test_ntk_equals_gram_of_dense_jacobians():
    torch.manual_seed(0)
    model = FCNet(d=5, n=6, c=3, rho=0.6)
    X = torch.randn(9, 5)
    J_ref = dense_jacobian_reference(model, X)
    J = per_sample_jacobian(model, X, chunk_size=4)
    assert J.shape == J_ref.shape == (9, 3, sum(p.numel() for p in model.parameters()))
    K = empirical_ntk(model, X, chunk_size=4)
    K_ref = J_ref.reshape(27, -1) @ J_ref.reshape(27, -1).T
    assert (K - K_ref).abs().max() / K_ref.abs().max() < 1e-8
    Ktr = empirical_ntk(model, X, mode="trace", jacobians=(J, J))
    assert torch.allclose(Ktr, K.reshape(9, 3, 9, 3).diagonal(dim1=1, dim2=3).sum(-1), rtol=1e-12)


def test_ntk_uses_implicit_adjoint_solves():
    model = FCNet(d=3, n=4, c=2, tol=1e-10)
    X = torch.randn(3, 3)
    per_sample_jacobian(model, X, solver="fixed_point")
    kinds = [s.kind for s in model.deq.last_info.derivatives]
    assert kinds and all(k.startswith("derivative") for k in kinds)  # adjoint linear solves


def test_ntk_symmetric_psd_and_cross_kernel():
    torch.manual_seed(1)
    model = FCNet(d=4, n=8, c=2)
    X, X2 = torch.randn(12, 4), torch.randn(5, 4)
    K = empirical_ntk(model, X)
    s = ntk_summary(K)
    assert s["symmetry_error"] < 1e-12
    assert s["lambda_min"] > -1e-10 * s["lambda_max"]
    K12 = empirical_ntk(model, X, X2)
    Kall = empirical_ntk(model, torch.cat([X, X2]))
    assert torch.allclose(K12, Kall[:24, 24:], rtol=1e-10, atol=1e-12)


def test_lambda_min_of_scalar_ntk_is_at_least_sigma_min_squared():
    """The u-block of K is ZᵀZ (Nguyen 2022 eq. 3.14): λ_min(K) ≥ σ_min(Z)² when width ≥ N."""
    torch.manual_seed(2)
    model = MonNet(d=4, n=12)
    X = torch.randn(8, 4)
    K = empirical_ntk(model, X)
    Z = equilibrium_matrix(model, X)
    lam0 = lambda_0(Z)
    assert lam0 > 0
    assert ntk_summary(K)["lambda_min"] >= lam0**2 * (1 - 1e-9)
    assert lambda_0(Z[:, :4].T) == 0.0  # width < N: ZᵀZ singular
    assert lambda_0(torch.cat([Z[:, :3], Z[:, :1]], dim=1)) == 0.0  # a repeated column: rank deficient


def test_linear_rate_check_reports_bound_and_conditions():
    torch.manual_seed(3)
    model = MonNet(d=4, n=32)
    X = torch.randn(6, 4)
    y = torch.randn(6)
    out = linear_rate_check(model, X, y, lr=0.02, steps=15, parts=lambda m: m.parts(), m=1.0)
    assert len(out["loss"]) == 16 and out["lambda_0"] > 0
    assert out["loss"][-1] < out["loss"][0]
    # the bound is checked, not assumed: recompute it
    rate = 1 - 0.02 * out["lambda_0"] ** 2 / 4
    assert out["bound_discrete"][5] == pytest.approx(out["loss"][0] * rate**5)
    assert out["bound_holds"] == all(l <= b * (1 + 1e-9) for l, b in zip(out["loss"], out["bound_discrete"]))
    assert set(out["theorem"]["conditions"]) == {"3.16", "3.17", "3.18", "step_size"}
    assert isinstance(out["theorem"]["all_hold"], bool)


def test_linear_rate_check_refuses_vector_outputs():
    model = FCNet(d=3, n=4, c=2)
    with pytest.raises(ValueError, match="scalar output"):
        linear_rate_check(model, torch.randn(3, 3), torch.randn(3), lr=0.1, steps=1)


def test_model_parameters_survive_the_ntk_of_a_model_registering_its_cell_twice():
    """MonotoneDEQ-style models hold the cell as ``model.cell`` and ``model.deq.cell``."""

    class Twice(MonNet):
        def __init__(self):
            super().__init__(d=3, n=5)
            self.cell = self.deq.cell

    model = Twice()
    before = {n: p for n, p in model.named_parameters()}
    empirical_ntk(model, torch.randn(3, 3))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    model(torch.randn(2, 3)).sum().backward()
    assert model.cell.A.grad is not None
