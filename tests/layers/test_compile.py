"""``compile_cell``: the forward solve through torch.compile, every derivative on the eager graph,
equal to the eager DEQ's first and second derivatives."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import deqdiff
from deqdiff.layers.compile import compile_cell, is_compiled_cell


class Cell(nn.Module):
    def __init__(self, n=6, d=3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(d, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.in_features)


def _derivatives(deq, x, params):
    z = deq(x)
    (dx,) = torch.autograd.grad(z[:, 0].sum(), x, create_graph=True)
    first = torch.autograd.grad(z.pow(2).sum(), params, create_graph=True)
    second = torch.autograd.grad((dx**2).sum() + sum((g**2).sum() for g in first), [x, *params])
    return [z.detach(), dx.detach(), *(g.detach() for g in first), *second]


def _check_against_eager(backend: str):
    torch.manual_seed(0)
    eager = Cell()
    cell = Cell()
    cell.load_state_dict(eager.state_dict())
    keys = list(cell.state_dict())
    compile_cell(cell, backend=backend)
    assert is_compiled_cell(cell) and isinstance(cell, Cell) and list(cell.state_dict()) == keys
    x = torch.randn(5, 3, requires_grad=True)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    got = _derivatives(deqdiff.DEQ(cell, tol=1e-12, max_iter=300), x, list(cell.parameters()))
    assert counters["stats"]["unique_graphs"] >= 1  # the forward solve did run compiled code
    ref = _derivatives(deqdiff.DEQ(eager, tol=1e-12, max_iter=300), x, list(eager.parameters()))
    for a, r in zip(got, ref):
        assert torch.allclose(a, r, rtol=1e-6, atol=1e-9)


def test_compiled_cell_first_and_second_derivatives_equal_eager_dynamo_only():
    _check_against_eager("eager")  # dynamo capture without code generation: fast


@pytest.mark.slow
def test_compiled_cell_first_and_second_derivatives_equal_eager_inductor():
    if shutil.which("gcc") is None and shutil.which("cc") is None and shutil.which("clang") is None:
        pytest.skip("torch.compile's inductor backend needs a C/C++ compiler on the CPU; none found")
    _check_against_eager("inductor")


def test_compile_cell_refuses_twice_and_non_modules():
    cell = compile_cell(Cell(), backend="eager")
    with pytest.raises(ValueError, match="compiled already"):
        compile_cell(cell)
    with pytest.raises(TypeError):
        compile_cell(lambda z, x: z)
