"""``DEQ`` initial state: a state shape other than the input's is stated (``state_shape``) and
solved correctly; the ``zeros_like(x)`` fallback that does not fit says what to pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqdiff


class WideCell(nn.Module):
    """z ↦ tanh(L [z; x]) with state width 10 and input width 5 (contractive in z)."""

    def __init__(self, in_features: int = 5, width: int = 10):
        super().__init__()
        self.width = width
        self.lin = nn.Linear(width + in_features, width)
        with torch.no_grad():  # ‖∂f/∂z‖ ≤ 0.5: a unique fixed point
            Wz = self.lin.weight[:, :width]
            Wz.mul_(0.5 / torch.linalg.matrix_norm(Wz, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(torch.cat([z, x], -1)))


def unrolled(cell, x, iters=200):
    z = x.new_zeros(x.shape[0], cell.width)
    for _ in range(iters):
        z = cell(z, x)
    return z


@pytest.fixture(autouse=True)
def seeded():
    """Fixed draws here without changing the global RNG state later tests start from."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def test_state_shape_gives_the_start_and_the_right_fixed_point():
    cell = WideCell().double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    deq = deqdiff.DEQ(cell, state_shape=10, tol=1e-12)
    z = deq(x)
    assert z.shape == (4, 10) and deq.last_info.forward.all_converged
    ref = unrolled(cell, x)
    torch.testing.assert_close(z, ref, atol=1e-10, rtol=0)
    (g,) = torch.autograd.grad(z.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0)
    # a tuple works too, and an explicit z0 still wins over state_shape
    assert deqdiff.DEQ(cell, state_shape=(10,))(x).shape == (4, 10)
    assert deqdiff.DEQ(cell, state_shape=(10,))(x, z0=ref.detach()).shape == (4, 10)


def test_default_start_that_does_not_fit_names_the_fix():
    cell = WideCell()
    with pytest.raises(ValueError, match=r"zeros_like\(x\) of shape \(4, 5\).*state_shape") as err:
        deqdiff.DEQ(cell)(torch.randn(4, 5))
    assert "mat1 and mat2" in str(err.value) and "\n" not in str(err.value)


def test_default_start_mapped_to_another_shape_suggests_it():
    class Grow(nn.Module):  # cat(z, x) of a width-5 state is width 10: the cell runs but changes shape
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 10)

        def forward(self, z, x):
            return torch.tanh(self.lin(torch.cat([z, x], -1)))

    with pytest.raises(ValueError, match=r"to \(3, 10\) \(state_shape=\(10,\)\?\)"):
        deqdiff.DEQ(Grow())(torch.randn(3, 5))


def test_bad_state_shape_is_refused():
    with pytest.raises(ValueError, match="state_shape"):
        deqdiff.DEQ(WideCell(), state_shape=(0,))


def test_default_start_still_works_when_it_fits():
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            with torch.no_grad():
                self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    deq = deqdiff.DEQ(Same(), tol=1e-10)
    x = torch.randn(3, 5)
    z = deq(x)
    assert z.shape == x.shape and deq.last_info.forward.all_converged
