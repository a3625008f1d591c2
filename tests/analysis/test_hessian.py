import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deqdiff.analysis.hessian import hessian_spectrum
from tests.analysis.helpers import FCNet


def unrolled_reference(model, X, Y, iters=80):
    """Dense Hessian, Gauss–Newton and dynamics parts by autodiff through plain iteration
    (exact on this contraction) w.r.t. the flattened cell parameters."""
    cell, head = model.deq.cell, model.head
    names = [n for n, _ in cell.named_parameters()]
    shapes = [p.shape for _, p in cell.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in cell.named_parameters()])

    def unpack(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def zstar(v):
        z = torch.zeros(X.shape[0], model.deq.cell.n)
        for _ in range(iters):
            z = functional_call(cell, unpack(v), (z, X))
        return z

    def lz(z):
        return F.cross_entropy(head(z), Y)

    H = torch.autograd.functional.hessian(lambda v: lz(zstar(v)), theta)
    J = torch.autograd.functional.jacobian(zstar, theta).reshape(-1, theta.numel())
    z = zstar(theta).detach()
    Hz = torch.autograd.functional.hessian(lambda zz: lz(zz.reshape(z.shape)), z.reshape(-1))
    GN = J.T @ Hz @ J
    return H, GN, H - GN


def test_top_eigenvalues_match_dense_unrolled_reference():
    torch.manual_seed(0)
    model = FCNet(d=3, n=4, c=3, rho=0.5)
    X, Y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    H, GN, DYN = unrolled_reference(model, X, Y)
    dim = H.shape[0]
    got = hessian_spectrum(model, F.cross_entropy, X, Y, k=3, num_iters=dim)
    assert got["dim"] == dim
    for name, M in (("total", H), ("gauss_newton", GN), ("dynamics", DYN)):
        ref = torch.linalg.eigvalsh(0.5 * (M + M.T)).flip(0)[:3]
        assert torch.allclose(torch.tensor(got[name]), ref, rtol=1e-7, atol=1e-10), name
    assert min(torch.linalg.eigvalsh(GN)) > -1e-10  # Term A is PSD for cross-entropy


def test_unknown_term_is_refused():
    model = FCNet(d=3, n=4, c=2)
    with pytest.raises(ValueError, match="terms"):
        hessian_spectrum(model, F.cross_entropy, torch.randn(2, 3), torch.tensor([0, 1]), terms=("nope",))
