"""Shared solver bookkeeping (in-place row compaction, the sparse residual trace, the stopping
rule) and Anderson's safeguards."""

import math

import pytest
import torch

from deqdiff.solvers.base import ResidualTrace, Tracker, compact_rows_


@pytest.mark.parametrize("S", [5, 300, 2600])
def test_compact_rows_in_place_equals_gather(S):
    gen = torch.Generator().manual_seed(S)
    t = torch.randn(S, 3, 4, generator=gen)
    keep = (torch.rand(S, generator=gen) < 0.6).nonzero().flatten()
    expected = t[keep].clone()
    out = compact_rows_(t, keep)
    assert out.data_ptr() == t.data_ptr()  # no second copy of the history
    assert torch.equal(out, expected)


def test_tracker_trace_keeps_converged_rows_final_value():
    """Rows that converged keep their last residual in the dense table, rows never
    recorded read inf, and the sparse store holds only updated rows."""
    z = torch.zeros(4, 2)
    track = Tracker(z, tol=0.0, atol=0.5)
    residuals = [torch.tensor([1.0, 0.4, 2.0, 3.0]), torch.tensor([0.3, 9.0, 1.0, 0.2]),
                 torch.tensor([7.0, 7.0, 0.1, 7.0])]
    for k, r in enumerate(residuals):
        track.update(k, z, r, torch.ones(4))
    expected = torch.tensor([[1.0, 0.4, 2.0, 3.0], [0.3, 0.4, 1.0, 0.2], [0.3, 0.4, 0.1, 0.2]])
    info = track.info("test", "forward")
    assert torch.equal(info.abs_trace, expected)
    assert torch.equal(info.rel_trace, expected)  # scale 1
    stored = sum(step[1].numel() for step in info.trace._steps)
    assert stored == 4 + 3 + 1


def test_tracker_compacted_rows_trace_matches_full():
    z = torch.zeros(3, 2)
    full, part = Tracker(z, 0.0, 0.5), Tracker(z, 0.0, 0.5)
    full.update(0, z, torch.tensor([1.0, 0.2, 2.0]), torch.ones(3))
    part.update(0, z, torch.tensor([1.0, 0.2, 2.0]), torch.ones(3))
    full.update(1, z, torch.tensor([0.9, 5.0, 0.1]), torch.ones(3))
    rows = torch.tensor([0, 2])
    part.update(1, z[rows], torch.tensor([0.9, 0.1]), torch.ones(2), rows)
    assert torch.equal(full.info("a", "b").abs_trace, part.info("a", "b").abs_trace)


def test_tracker_never_counts_an_overflowed_row_as_converged():
    """An iterate that overflowed has residual = scale = inf, and inf ≤ tol·inf holds."""
    z = torch.zeros(2, 2)
    track = Tracker(z, tol=1e-6, atol=0.0)
    running = track.update(0, z, torch.tensor([math.inf, math.nan]), torch.tensor([math.inf, math.inf]))
    assert running.all() and not track.finished


def test_residual_trace_dense_roundtrip_and_empty():
    a = torch.rand(5, 3)
    trace = ResidualTrace.from_dense(a, 2 * a)
    assert torch.equal(trace.dense(0), a) and torch.equal(trace.dense(1), 2 * a)
    assert torch.equal(trace.scaled(4.0).dense(0), a / 4)
    empty = ResidualTrace(3, torch.float32, torch.device("cpu"))
    assert empty.dense().shape == (0, 3)


def test_anderson_mixing_keeps_the_state_dtype_under_autocast():
    """Training with ``--amp bf16`` runs f under autocast; Anderson's own least squares must
    stay in the state's dtype (autocast turned its contraction into bfloat16 and broke it)."""
    from deqdiff.solvers.anderson import anderson

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=gen, dtype=torch.float32) * 0.3 / 4
    x = torch.randn(5, 16, generator=gen, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = anderson(lambda z: torch.tanh(z @ A.T + x), torch.zeros(5, 16, dtype=torch.float32),
                           tol=2e-2, max_iter=50)
    assert z.dtype == torch.float32 and info.all_converged


def _secant_trap(seed: int):
    """tanh(W z + x) with a dominant rank-one W and large inputs (not a contraction everywhere:
    seed 139 has two fixed points on one row, so it is not used): plain iteration converges,
    but Anderson's secant model, built far from z*, extrapolates badly on some rows."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    u, v = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    a = float(torch.empty((), dtype=torch.float64).uniform_(0.5, 4, generator=g))
    W = a * (u @ v.T) / n + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(50, n, generator=g, dtype=torch.float64) * float(torch.empty((), dtype=torch.float64).uniform_(0.5, 4, generator=g))
    return lambda z: torch.tanh(z @ W.T + x), torch.zeros(50, n, dtype=torch.float64)


@pytest.mark.parametrize("seed", [4, 25, 41, 132])
def test_anderson_restart_rescues_rows_that_bounce(seed):
    """Without the restart some rows need 2.5–20× the iterations of plain iteration (or never
    converge; how many depends on rounding, the bounce being chaotic); with it Anderson is no
    slower than plain iteration on any row and lands on the same fixed point."""
    from deqdiff.solvers.anderson import anderson
    from deqdiff.solvers.fixed_point_iteration import fixed_point_iteration

    f, z0 = _secant_trap(seed)
    kw = dict(tol=1e-10, max_iter=1000)
    z_fp, fp = fixed_point_iteration(f, z0, **kw)
    _, plain = anderson(f, z0, restart=None, **kw)
    z, safe = anderson(f, z0, **kw)
    assert fp.all_converged and safe.all_converged
    assert safe.max_iterations <= fp.max_iterations
    assert plain.max_iterations >= 2.5 * safe.max_iterations
    assert torch.allclose(z, z_fp, atol=1e-7)


def test_residual_trace_first_matches_the_dense_table():
    """``first`` reads each row's first recorded residual without expanding the trace."""
    t = ResidualTrace(4, torch.get_default_dtype(), torch.device("cpu"))
    t.append(torch.tensor([1, 3]), torch.tensor([1.0, 3.0]), torch.tensor([0.1, 0.3]))
    t.append(None, torch.full((4,), 9.0), torch.full((4,), 0.9))
    t.append(torch.tensor([0]), torch.tensor([5.0]), torch.tensor([0.5]))
    for which in (0, 1):
        table = t.dense(which)
        expected = torch.stack([table[(table[:, j] < math.inf).nonzero()[0, 0], j] for j in range(4)])
        assert torch.equal(t.first(which), expected)
    empty = ResidualTrace(3, torch.float32, torch.device("cpu"))
    assert torch.isinf(empty.first()).all()


def test_tracker_returns_each_rows_iterate_and_never_the_callers_start():
    """While every row runs the tracker keeps a reference to the latest iterate; a row that
    converges keeps the iterate it converged at, and a solve that stops at once hands back a
    copy of its start, not the caller's tensor."""
    z0 = torch.zeros(3, 2)
    track = Tracker(z0, tol=0.0, atol=0.5)
    track.update(0, z0, torch.tensor([1.0, 1.0, 1.0]), torch.ones(3))
    z1 = torch.full((3, 2), 1.0)
    track.update(1, z1, torch.tensor([0.1, 1.0, 1.0]), torch.ones(3))  # row 0 converges at z1
    z2 = torch.full((3, 2), 2.0)
    track.update(2, z2, torch.tensor([9.0, 0.1, 1.0]), torch.ones(3))
    info = track.info("t", "forward")
    assert torch.equal(track.result, torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
    assert info.iterations.tolist() == [1, 2, 2] and info.converged.tolist() == [True, True, False]
    assert torch.equal(info.rel_residual, torch.tensor([0.1, 0.1, 1.0]))
    once = Tracker(z0, tol=0.0, atol=0.5)
    once.update(0, z0, torch.zeros(3), torch.ones(3))
    assert once.finished and once.result is not z0 and torch.equal(once.result, z0)


def test_tracker_static_rows_are_converged_at_zero_whatever_the_iterates_do():
    """Static rows (b = 0 of a linear solve from 0) count as converged at iteration 0 with
    residual 0 and return their start, even if an iterate turns them non-finite, and the other
    rows get exactly the statistics they get without them."""
    z0 = torch.zeros(3, 2)
    static = torch.tensor([False, True, False])
    track, alone = Tracker(z0, 0.0, 0.5, static=static), Tracker(z0[[0, 2]], 0.0, 0.5)
    for k, (z, r) in enumerate([(torch.ones(3, 2), torch.tensor([2.0, 0.0, 3.0])),
                                (torch.tensor([[1.5] * 2, [math.nan] * 2, [1.5] * 2]), torch.tensor([0.2, math.nan, 3.0])),
                                (torch.full((3, 2), 5.0), torch.tensor([9.0, math.nan, 0.4]))]):
        track.update(k, z, r, torch.ones(3))
        alone.update(k, z[[0, 2]], r[[0, 2]], torch.ones(2))
    info, ref = track.info("t", "linear"), alone.info("t", "linear")
    assert track.finished and info.converged.all()
    assert info.iterations.tolist() == [ref.iterations[0], 0, ref.iterations[1]]
    assert info.residual[1] == 0 and info.rel_residual[1] == 0 and torch.equal(track.result[1], z0[1])
    assert torch.equal(track.result[[0, 2]], alone.result)


def test_linear_solve_rows_with_zero_right_hand_side_cost_no_masks_and_return_zero():
    from deqdiff.solvers.base import get_solver

    gen = torch.Generator().manual_seed(0)
    J = torch.randn(6, 6, generator=gen) * 0.1

    class Op:
        rows, row_size = 5, 6

        def mv(self, v):
            return v - v @ J.T

        def complement_mv(self, v):
            return v @ J.T

    b = torch.randn(5, 6, generator=gen)
    b[[1, 3]] = 0.0
    for name in ("richardson", "anderson"):
        x, info = get_solver(name, "linear")(Op(), b, None, tol=1e-10, max_iter=100)
        x_ref, info_ref = get_solver(name, "linear")(Op(), b[[0, 2, 4]], None, tol=1e-10, max_iter=100)
        assert torch.equal(x[[1, 3]], torch.zeros(2, 6)) and info.converged.all()
        assert info.iterations[[1, 3]].tolist() == [0, 0]
        assert torch.allclose(x[[0, 2, 4]], x_ref, rtol=0, atol=1e-12)
        assert torch.equal(info.iterations[[0, 2, 4]], info_ref.iterations)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norm_is_exact_for_zero_tiny_and_huge_rows_and_ignores_what_it_is_told(dtype):
    from deqdiff.solvers.base import row_norm

    fi = torch.finfo(dtype)
    v = torch.zeros(5, 4, dtype=dtype)
    v[1] = 3.0 * fi.tiny * 4  # squares underflow: the norm comes from the rescaled row
    v[2] = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=dtype)
    v[3] = fi.max / 4  # squares overflow
    v[4, 0] = math.inf
    n = row_norm(v)
    assert n[0] == 0 and n[4] == math.inf and n[2] == 5
    assert torch.isclose(n[1], torch.tensor(3.0 * fi.tiny * 4 * 2, dtype=dtype), rtol=1e-5)
    assert torch.isclose(n[3], torch.tensor(fi.max / 2, dtype=dtype), rtol=1e-5)
    assert row_norm(torch.zeros(3, 2, dtype=dtype)).eq(0).all()
    ignore = torch.tensor([False, True, False, True, False])
    m = row_norm(v, ignore)
    assert torch.equal(m[~ignore], n[~ignore])


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("read_midway", [False, True])
def test_tracker_answers_each_row_from_the_iteration_it_froze_at(compact, read_midway):
    """Against a direct bookkeeping: rows freeze at scattered iterations, with and without the
    solver compacting its state, and reading the statistics midway changes nothing (the latest
    iterate of the running rows is written out only when read)."""
    gen = torch.Generator().manual_seed(3)
    S, K = 40, 12
    res = torch.rand(K, S, generator=gen) * torch.linspace(2.0, 0.01, K)[:, None]
    track = Tracker(torch.zeros(S, 3), tol=0.0, atol=0.1)
    want_z, want_k = torch.full((S, 3), -1.0), torch.full((S,), -1)
    rows = None
    for k in range(K):
        z_full = k + torch.arange(S)[:, None].expand(S, 3) / 100  # a distinct iterate per row
        held = torch.arange(S) if rows is None else rows
        running = track.update(k, z_full[held], res[k, held], torch.ones(held.numel()), rows)
        newly = held[(res[k, held] <= 0.1) & (want_k[held] < 0)]
        want_z[newly], want_k[newly] = z_full[newly], k
        if read_midway and k % 3 == 1:
            track.result, track.iterations  # noqa: B018 (reads settle the pending iterate)
        if track.finished:
            break
        if compact and k % 2 == 1:
            rows = held[running]
    last = want_k < 0
    want_z[last], want_k[last] = z_full[last], k
    assert torch.equal(track.result, want_z)
    assert torch.equal(track.iterations, want_k)
    assert torch.equal(track.done, ~last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norm_common_cases_cost_one_reduction_and_its_extremes(dtype):
    """Rows inside the band, with rows the caller ignores or exactly zero rows among them, take
    the fast path (the ignored rows' fill must sit inside the band in the dtype itself: a band edge
    rounded to float32 fell outside it and sent every call down the recomputing path)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from deqdiff.solvers.base import row_norm

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    v = torch.randn(50, 8, dtype=dtype)
    v[3] = 0.0
    ignore = torch.zeros(50, dtype=torch.bool)
    ignore[[3, 7]] = True
    for args, most in (((v, ignore), 6), ((v,), 12)):
        with Ops() as ops:
            n = row_norm(*args)
        assert torch.equal(n, torch.linalg.vector_norm(v, dim=1))
        assert "index_select" not in ops.names and len(ops.names) <= most, ops.names
