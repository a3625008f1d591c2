"""Tensor memory counting (deqdiff.training.memtrace) against tensors of known size."""

from __future__ import annotations

import torch

from deqdiff.training.memtrace import MIB, SavedTensors, TensorMemory


def test_live_and_peak_bytes_follow_allocations_and_frees():
    x = torch.ones(1000, dtype=torch.float64)  # before entering: not counted
    with TensorMemory() as mem:
        a = torch.zeros(1 << 17, dtype=torch.float64)  # 1 MiB
        assert mem.current == MIB and mem.peak == MIB
        b = a * 2  # another MiB
        view = b[::2]  # a view shares b's storage: not counted again
        b.add_(1)  # in place: nothing new
        assert mem.current == 2 * MIB
        del a
        assert mem.current == MIB and mem.peak == 2 * MIB
        y = x + 1  # 8000 bytes
        del b
        assert mem.current == MIB + 8000  # the view keeps b's storage alive
        del view
        assert mem.current == 8000 and mem.peak_mib == 2.0
        mem.reset_peak()
        assert mem.peak == 8000
    del y


def test_peak_sees_temporaries_of_a_backward_pass():
    w = torch.randn(256, 256, dtype=torch.float32, requires_grad=True)
    with TensorMemory() as mem:
        h = torch.tanh(torch.randn(512, 256, dtype=torch.float32) @ w)  # input, pre-activation, h: 0.5 MiB each
        h.sum().backward()
        del h
        assert mem.current == w.grad.nbytes  # graph and activations freed: the gradient remains (0.25 MiB)
    assert mem.peak_mib >= 1.5


def test_saved_tensors_counts_each_saved_storage_once():
    a = torch.randn(1024, requires_grad=True)
    b = torch.randn(1024, requires_grad=True)
    with SavedTensors() as saved:
        c = a * b  # saves a and b
        d = c * b  # saves c and b again (counted once)
    assert saved.bytes == 3 * 1024 * a.element_size()
    with SavedTensors() as none:
        with torch.no_grad():
            a * b
    assert none.bytes == 0
    d.sum().backward()
