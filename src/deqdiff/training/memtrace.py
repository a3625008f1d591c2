"""Tensor memory of a piece of training, counted by PyTorch itself rather than read from the
process: the CPU counterpart of ``torch.cuda.memory_allocated`` / ``max_memory_allocated``
(which count the caching allocator's live blocks and have no CPU equivalent), and the bytes
autograd saves for the backward pass.

* :class:`TensorMemory` — a ``TorchDispatchMode`` that sees every tensor an operation returns
  inside it and counts each new storage once, from the operation that created it until the
  storage is freed (a weak reference's callback): current and peak live bytes of the tensors
  created inside the context. Views and in-place results share their base's storage and are
  not counted again; tensors that existed before entering are not counted at all. Temporaries
  inside a fused kernel that never become tensors (a fused attention's work buffers, LAPACK
  workspaces) are not seen, nor is anything that is not a tensor (autograd's node objects,
  Python objects, the allocator's fragmentation) — the resident set (``VmHWM``) measures those.
* :class:`SavedTensors` — ``torch.autograd.graph.saved_tensors_hooks`` counting the storages
  saved for backward by the graph recorded inside it (each storage once, live or not). It
  sees the graph an ordinary forward pass records (an unrolled network's activations) but not
  graphs built later inside a backward pass (a DEQ's implicit backward records vjp graphs of
  its cell there); :class:`TensorMemory` sees both.
* :func:`current_rss_mib`, :func:`peak_rss_mib`, :func:`reset_peak_rss` — the process's resident
  set now, its high-water mark (``VmHWM``) and a reset of that mark (Linux ``clear_refs``), for
  what the counters above do not see.
"""

from __future__ import annotations

import resource
import sys
import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemory", "SavedTensors", "MIB", "current_rss_mib", "peak_rss_mib", "reset_peak_rss"]

MIB = float(2 ** 20)


class TensorMemory(TorchDispatchMode):
    """Live bytes of the tensor storages created inside ``with TensorMemory() as mem:``.

    ``mem.current`` / ``mem.peak`` (bytes; ``peak`` since entering or the last
    :meth:`reset_peak`), ``mem.peak_mib``. Nests with other modes; counts every device."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB

    @property
    def current_mib(self) -> float:
        return self.current / MIB

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.current

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is ref:
            del self._live[key]
            self.current -= entry[0]

    def _track(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse, ...)
            return
        key = st.data_ptr()
        if key == 0 or key in self._live:
            return
        ref = weakref.ref(st, lambda r, key=key: self._freed(key, r))
        self._live[key] = (st.nbytes(), ref)
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out


class SavedTensors:
    """``with SavedTensors() as saved:`` — ``saved.bytes`` / ``saved.mib``: the storages autograd
    saved for backward while recording inside the context (each storage once, whether or not
    it also lives elsewhere, e.g. a parameter)."""

    def __init__(self):
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            self._seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def mib(self) -> float:
        return self.bytes / MIB

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    """Resident memory of this process now (MiB): ``VmRSS``; without ``/proc``, ``ru_maxrss``."""
    rss = _status_mib("VmRSS")
    return rss if rss is not None else _maxrss_mib()


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def peak_rss_mib() -> float:
    """The resident high-water mark of this process (MiB): ``VmHWM`` (which
    :func:`reset_peak_rss` resets); without ``/proc``, ``ru_maxrss`` (which no reset lowers)."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else _maxrss_mib()


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current RSS (``/proc/self/clear_refs``, Linux ≥
    4.0), so that a later peak is that of what runs next; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
