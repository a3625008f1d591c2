"""Invalid options raise ValueError naming the option; unknown options raise TypeError."""

from __future__ import annotations

import pytest
import torch

from deqdiff.solvers import available_solvers, get_solver
from solver_problems import DenseOp

Z0 = torch.zeros(2, 3, dtype=torch.float64)
G = lambda z: 0.5 * z + 1.0  # noqa: E731
OP = DenseOp(torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone())
B = torch.ones(2, 3, dtype=torch.float64)


def test_registry():
    assert available_solvers("forward") == ["anderson", "auto", "broyden", "fixed_point", "neural", "newton_krylov"]
    assert available_solvers("linear") == ["anderson", "bicgstab", "dense", "gmres", "richardson"]
    assert get_solver("anderson", "linear") is not get_solver("anderson", "forward")


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("fixed_point", {"damping": 0.0}, "damping"),
        ("fixed_point", {"damping": 1.5}, "damping"),
        ("anderson", {"m": 0}, "memory m"),
        ("anderson", {"m": 2.5}, "memory m"),
        ("anderson", {"beta": 0.0}, "beta"),
        ("anderson", {"beta": 1.2}, "beta"),
        ("anderson", {"lam": -1e-3}, "lam"),
        ("anderson", {"restart": 0.5}, "restart"),
        ("anderson", {"max_restarts": -1}, "max_restarts"),
        ("broyden", {"m": 0}, "memory m"),
        ("newton_krylov", {"eta": 0.0}, "eta"),
        ("newton_krylov", {"eta": 1.0}, "eta"),
        ("newton_krylov", {"inner_max_iter": 0}, "inner_max_iter"),
        ("newton_krylov", {"restart": 0}, "restart"),
    ],
)
def test_invalid_forward_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name)(G, Z0, **options)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("richardson", {"omega": 0.0}, "omega"),
        ("richardson", {"omega": -1.0}, "omega"),
        ("richardson", {"damping": 2.0}, "damping"),
        ("anderson", {"omega": 0.0}, "omega"),
        ("anderson", {"m": 0}, "memory m"),
        ("gmres", {"restart": 0}, "restart"),
        ("gmres", {"restart": 1.5}, "restart"),
    ],
)
def test_invalid_linear_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, "linear")(OP, B, None, **options)


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "dense", "richardson"])
def test_unknown_linear_option(name):
    with pytest.raises(TypeError):
        get_solver(name, "linear")(OP, B, None, not_an_option=1)


@pytest.mark.parametrize("name", ["anderson", "broyden", "newton_krylov"])
def test_unknown_forward_option(name):
    with pytest.raises(TypeError):
        get_solver(name)(G, Z0, not_an_option=1)
