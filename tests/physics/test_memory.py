"""Training memory does not accumulate (benchmarks/bench_memory.py measures the RSS).

The regression: ``FixedPointJacobian`` cached its linearization (z*, the dense LU of
I − ∂f/∂z, the vjp graphs of f) in a dict on itself while the linearization's closures referred
back to the operator. That cycle outlived each training step until a full garbage collection,
so the RSS of ``deqdiff pinn vdp`` grew with the number of steps (≈ 1 MiB per Adam epoch,
2 GB peak by default). Everything a step allocates must be freed by reference counting alone:
no cyclic garbage holding tensors, and a number of live tensors independent of the length of
training.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from deqdiff import DEQ
from deqdiff.engine.fixed_point import FixedPointInfo
from deqdiff.engine.operators import FixedPointJacobian, Linearization
from deqdiff.physics.models import TanhCell
from deqdiff.physics.vdp import VdPConfig, build_trainer
from deqdiff.solvers.base import SolveInfo

#: objects that must never be left in reference cycles by a step
_HEAVY = (torch.Tensor, FixedPointJacobian, Linearization, SolveInfo, FixedPointInfo)


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups


class _NoCollector:
    """Run with the cyclic garbage collector off; ``garbage()`` = what only it would free."""

    def __enter__(self):
        gc.collect()
        self.enabled = gc.isenabled()
        gc.disable()
        return self

    def garbage(self) -> list:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = [o for o in gc.garbage if isinstance(o, _HEAVY)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return found

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


def _describe(objs) -> str:
    return ", ".join(sorted({type(o).__name__ + (str(tuple(o.shape)) if isinstance(o, torch.Tensor) else "")
                             for o in objs}))[:500]


@pytest.mark.parametrize("width,rows", [(12, 16), (70, 8)], ids=["dense-lu", "richardson"])
def test_fixed_point_derivatives_leave_no_cycles(width, rows):
    """The PINN pattern (∂z*/∂x by forward mode, then ∇θ of a loss on it) through a DEQ: both
    derivative-solve paths (dense LU blocks; Richardson on the rows still running, width > 64)
    free their operator, linearization and statistics by reference counting."""
    torch.manual_seed(0)
    deq = DEQ(TanhCell(width, 3, rho=0.6), solver="anderson", tol=1e-8)
    x = torch.randn(rows, 3)

    def step() -> int:
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            z, dz = torch.autograd.forward_ad.unpack_dual(deq(dual))
        ((dz ** 2).sum() + z.sum()).backward()
        return len(deq.last_info.derivatives)

    step()  # the first call imports torch._dynamo lazily, a one-time cycle holding its frames
    with _NoCollector() as nc:
        solves = step()
        info = weakref.ref(deq.last_info)
        deq.last_info = None
        freed = info() is None
        leaked = nc.garbage()
    assert solves > 0, "derivative solves should be recorded"
    assert freed, "the FixedPointInfo of a call outlives its graph"
    assert not leaked, f"cyclic garbage holding tensors/solver state: {_describe(leaked)}"


def _tiny_vdp(**kw) -> VdPConfig:
    base = dict(width=16, batch=32, epochs=6, lbfgs_steps=0, n_test=2, rollout_t_end=1.0)
    base.update(kw)
    return VdPConfig.for_setup("conditioned", **base)


@pytest.mark.parametrize("phase", ["adam", "lbfgs"])
def test_vdp_training_memory_is_bounded(phase):
    """The default VdP job's training steps (conditioned flow map, forward-mode ∂y/∂t, implicit
    second derivatives, spectral bound) create no cyclic garbage, and the live tensors do not
    grow with the number of steps (history records hold floats; the statistics of the last
    call are replaced, not appended to)."""
    adam = phase == "adam"
    trainer = build_trainer(_tiny_vdp(epochs=5 if adam else 1, lbfgs_steps=0 if adam else 4))
    if not adam:  # few inner iterations (the test must take seconds); L-BFGS keeps history_size pairs
        trainer.phases[1].make_optimizer = lambda p: torch.optim.LBFGS(
            p, lr=1.0, max_iter=2, history_size=1, line_search_fn="strong_wolfe")
    counts = []
    with _NoCollector() as nc:
        trainer.run(2)  # L-BFGS: its state (history, direction) exists after its first step
        while not trainer.done:
            counts.append(_live_tensors())
            trainer.step()
        counts.append(_live_tensors())
        leaked = nc.garbage()
    assert trainer.history[-1]["phase"] == phase
    assert not leaked, f"cyclic garbage holding tensors/solver state: {_describe(leaked)}"
    # Adam: exactly constant; L-BFGS: the last solve's residual traces vary with its iterations
    slack = 0 if adam else 16
    assert max(counts) <= counts[0] + slack, f"live tensors per step: {counts}"
    for rec in trainer.history:
        assert not any(isinstance(v, torch.Tensor) for v in rec.values()), rec
    derivs = trainer.model.core.deq.last_info.derivatives
    assert len(derivs) <= 8, f"{len(derivs)} derivative statistics kept from one call"
