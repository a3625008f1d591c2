"""Mixed precision of DEQ layers: the cell under autocast, the solver state and stopping rule in float32."""

from __future__ import annotations

import torch
from torch import nn

import deqdiff
from tests.conftest import rel_err


class Cell(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.dtypes: list[torch.dtype] = []

    def forward(self, z, x):
        h = self.lin(z)
        self.dtypes.append(h.dtype)
        return torch.tanh(h + x)


def _setup():
    torch.manual_seed(0)
    cell = Cell().float()
    x = torch.randn(8, 16, dtype=torch.float32)
    return cell, x


def test_bf16_cell_float32_state_and_derivative_solves_with_the_same_bf16_cell():
    cell, x = _setup()
    deq = deqdiff.DEQ(cell, tol=1e-2, max_iter=60, state_shape=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
    assert cell.dtypes and set(cell.dtypes) == {torch.bfloat16}  # the cell's matmul in bf16
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    info = deq.last_info.forward
    assert info.residual.dtype == torch.float32 and info.all_converged  # stopping rule in float32
    cell.dtypes.clear()
    z.pow(2).sum().backward()  # outside the autocast block: derivative solves still use the bf16 cell
    assert cell.dtypes and set(cell.dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())

    with torch.no_grad():
        z32 = deqdiff.DEQ(cell, tol=1e-5, max_iter=100, state_shape=16)(x)
    assert rel_err(z, z32) < 3e-2  # bf16 has 8 bits of mantissa


def test_no_autocast_leaves_everything_in_the_state_dtype():
    cell, x = _setup()
    deqdiff.DEQ(cell, tol=1e-5, state_shape=16)(x)
    assert set(cell.dtypes) == {torch.float32}


def test_bf16_backward_through_group_norm_cell():
    # CPU autocast hands group norm a bfloat16 input with float32 affine parameters; the dense
    # derivative path (vmap over vjps) fails on that in PyTorch, so autocast DEQs default to GMRES
    from deqdiff.models.conv import ConvCell

    torch.manual_seed(1)
    cell = ConvCell(4, 4, groups=2).float()
    deq = deqdiff.DEQ(cell, tol=1e-3, max_iter=30)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
    z.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())
    assert deq.last_info.derivatives[0].solver.startswith("gmres")
