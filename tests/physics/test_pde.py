"""The PDE interface: domains, conditions, data terms and samplers assembled into a loss — checked
on exact solutions (every term vanishes; a wrong sign or value does not), a user-defined PDE in
under 30 lines (the documentation example), and bit-identical resume with residual resampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deqdiff.physics.coordinate_models import CoordinatePIDEQ
from deqdiff.physics.pde import (Box, Data, Dirichlet, FixedSet, Initial, Interval, Neumann, PDEProblem, Periodic,
                                 ResidualResampling, Uniform)
from deqdiff.physics.pde_runner import graph_bytes, train_pde


class Exact(nn.Module):
    """A 'model' that is a known function of the coordinates (autodiff engine)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, X, **_):
        return (self.fn(X) + 0 * self.dummy)[:, None]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_box_sampling_faces_and_grid():
    box = Box({"x": (-1.0, 2.0), "t": (0.0, 0.5)})
    X = box.sample(500, _gen())
    assert X.shape == (500, 2) and (X[:, 0] >= -1).all() and (X[:, 0] <= 2).all() and (X[:, 1] <= 0.5).all()
    F = box.sample_face("x", "both", 400, _gen())
    assert set(F[:, 0].tolist()) == {-1.0, 2.0} and 100 < int((F[:, 0] == -1).sum()) < 300
    assert (box.sample_face("t", "low", 5, _gen())[:, 1] == 0).all()
    axes, G = box.grid((4, 3))
    assert G.shape == (12, 2) and axes[0][-1] == 2.0
    assert Interval("x", 0, 1).coords == ("x",)
    for bad in ({"x": (1.0, 0.0)}, {"xy": (0.0, 1.0)}, {}):
        with pytest.raises(ValueError):
            Box(bad)
    with pytest.raises(ValueError, match="unknown coordinate"):
        box.sample_face("y", "low", 3)


def _heat_problem(**kw):
    """u_t = u_xx on [−1, 1] × [0, 1]: u = e^{−π² t} cos(πx) is periodic in x, has zero
    Neumann data at x = ±1, and u(x, 0) = cos(πx)."""
    return PDEProblem(domain=Box({"x": (-1.0, 1.0), "t": (0.0, 1.0)}), residual=lambda d: d.u_t - d.u_xx,
                      conditions=kw.pop("conditions", [Initial(lambda p: torch.cos(math.pi * p.x), n=30),
                                                       Periodic("x", derivatives=2, n=20),
                                                       Neumann("x", 0.0, n=20)]), **kw)


def _exact_heat(X):
    return torch.exp(-math.pi ** 2 * X[:, 1]) * torch.cos(math.pi * X[:, 0])


def test_every_term_vanishes_at_the_exact_solution_and_not_elsewhere():
    pb = _heat_problem(collocation=Uniform(50))
    batch = pb.sample(_gen(), 0, None)
    out = pb.loss(Exact(_exact_heat), batch)
    for k in ("pde", "initial", "periodic_x", "neumann_x"):
        assert out.terms[k] < 1e-25, (k, out.terms[k])
    # a shifted solution breaks the initial condition only; a sine breaks Neumann only
    shifted = pb.loss(Exact(lambda X: _exact_heat(X) + 0.1), batch).terms
    assert shifted["initial"] == pytest.approx(0.01) and shifted["pde"] < 1e-25 and shifted["periodic_x"] < 1e-25
    sine = pb.loss(Exact(lambda X: torch.exp(-math.pi ** 2 * X[:, 1]) * torch.sin(math.pi * X[:, 0])), batch).terms
    assert sine["neumann_x"] > 1e-3 and sine["pde"] < 1e-25


def test_neumann_uses_the_outward_normal_and_dirichlet_a_callable_value():
    box = Box({"x": (0.0, 1.0)})
    linear = Exact(lambda X: 2 * X[:, 0])  # u = 2x: u_x = 2, outward ∂u/∂n = −2 at x = 0, +2 at x = 1
    pb = PDEProblem(domain=box, residual=lambda d: d.u_xx, collocation=Uniform(10),
                    conditions=[Neumann("x", 1.0, side="high", n=5), Dirichlet("x", lambda p: 2 * p.x, n=6)])
    t = pb.loss(linear, pb.sample(_gen(), 0, None)).terms
    assert t["dirichlet_x"] < 1e-28 and t["neumann_x"] == pytest.approx(1.0) and t["pde"] == 0
    low = PDEProblem(domain=box, residual=lambda d: d.u_xx, conditions=[Neumann("x", -2.0, side="low", n=4)],
                     collocation=Uniform(3))
    assert low.loss(linear, low.sample(_gen(), 0, None)).terms["neumann_x"] < 1e-28


def test_data_terms_and_weights():
    X = torch.tensor([[0.2, 0.1], [0.5, 0.3]])
    pb = _heat_problem(conditions=[], data=[Data(X, _exact_heat(X) + 0.5, weight=2.0)], collocation=Uniform(5))
    out = pb.loss(Exact(_exact_heat), pb.sample(_gen(), 0, None))
    assert out.terms["data"] == pytest.approx(0.25) and float(out.total.detach()) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="data"):
        Data(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="distinct names"):
        _heat_problem(conditions=[Dirichlet("x"), Dirichlet("x")])


def test_fixed_set_and_residual_resampling_follow_the_residual():
    pb = _heat_problem(collocation=FixedSet(40))
    a, b = pb.sample(_gen(0), 0, None)["pde"], pb.sample(_gen(1), 1, None)["pde"]
    assert torch.equal(a, b)
    # a 'model' whose residual is large only for x > 0.5: resampled points concentrate there
    bump = Exact(lambda X: _exact_heat(X) + torch.relu(X[:, 0] - 0.5) ** 3 * 50)
    rad = ResidualResampling(200, every=2, pool_factor=10, k=2.0, c=0.0)
    pb = _heat_problem(collocation=rad)
    first = pb.sample(_gen(), 0, bump)["pde"]
    assert float((first[:, 0] > 0.5).float().mean()) < 0.4  # uniform at the start
    again = pb.sample(_gen(), 2, bump)["pde"]
    assert float((again[:, 0] > 0.5).float().mean()) > 0.95 and rad.history == [2]
    state = pb.state_dict()
    fresh = _heat_problem(collocation=ResidualResampling(200, every=2))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.collocation.X, again)


def test_user_defined_pde_in_under_30_lines_trains():
    """The documentation example: a user's own equation (Allen–Cahn-type reaction–diffusion with
    a Neumann boundary) as a residual of named derivatives, trained as an implicit DEQ."""
    # --- documentation example (docs: "Your own PDE") -------------------------------------
    problem = PDEProblem(
        domain=Box({"x": (-1.0, 1.0), "t": (0.0, 0.5)}),
        residual=lambda d: d.u_t - 0.01 * d.u_xx + d.u ** 3 - d.u,
        conditions=[Initial(lambda p: 0.5 * torch.cos(math.pi * p.x), n=32),
                    Neumann("x", 0.0, n=16)],
        collocation=Uniform(64),
    )
    model = CoordinatePIDEQ([(-1.0, 1.0), (0.0, 0.5)], out_features=1, width=8, tol=1e-8)
    trainer = train_pde(problem, model, epochs=15, lr=2e-2)
    # ----------------------------------------------------------------------------------------
    h = trainer.history
    assert h[-1]["total"] < 0.5 * h[0]["total"]
    assert {"pde", "initial", "neumann_x"} <= set(h[-1])


def test_resume_with_residual_resampling_is_bit_identical(tmp_path):
    def make():
        torch.manual_seed(0)
        pb = _heat_problem(collocation=ResidualResampling(32, every=3, pool_factor=4),
                           conditions=[Initial(lambda p: torch.cos(math.pi * p.x), n=16)])
        return pb, CoordinatePIDEQ([(-1.0, 1.0), (0.0, 1.0)], 1, 6, tol=1e-9)

    pb, m = make()
    straight = train_pde(pb, m, epochs=7, lr=1e-2)
    pb, m = make()
    ck = tmp_path / "c.pt"
    # stop after 4 steps (mid-way between resamplings at steps 3 and 6)
    from deqdiff.physics.pde_runner import make_trainer

    tr = make_trainer(pb, m, epochs=7, lr=1e-2)
    for _ in range(4):
        tr.step()
    tr.save(ck, {"problem": pb.state_dict()})
    pb2, m2 = make()
    resumed = train_pde(pb2, m2, epochs=7, lr=1e-2, resume=ck)
    assert [h["total"] for h in resumed.history] == [h["total"] for h in straight.history]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_graph_memory_of_unrolled_exceeds_implicit():
    pb = _heat_problem(collocation=Uniform(64))
    torch.manual_seed(0)
    imp = CoordinatePIDEQ([(-1.0, 1.0), (0.0, 1.0)], 1, 16, tol=1e-8, rho=0.9)
    unr = CoordinatePIDEQ([(-1.0, 1.0), (0.0, 1.0)], 1, 16, tol=1e-8, rho=0.9, mode="unrolled")
    unr.load_state_dict(imp.state_dict())
    batch = pb.sample(_gen(), 0, None)
    a, b = pb.loss(imp, batch), pb.loss(unr, batch)
    assert a.terms["total"] == pytest.approx(b.terms["total"], rel=1e-6)
    assert graph_bytes(b.total) > 3 * graph_bytes(a.total) > 0
