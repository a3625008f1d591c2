"""Running sums of loss, accuracy and equilibrium-solver statistics, reducible over ranks.

Kept as two small tensors (sums, maxima) so one all-reduce each aggregates a step or an epoch
over data-parallel ranks, and so they can be saved in a checkpoint mid-epoch."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Meter"]

_SUMS = ("loss", "correct", "n", "fwd_iter", "fwd_res", "fwd_unconverged", "bwd_iter", "bwd_n", "jac")
_MAXS = ("fwd_iter_max", "fwd_res_max", "bwd_iter_max")


class Meter:
    """Accumulates per-sample sums and maxima; :meth:`summary` gives the means."""

    def __init__(self):
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.maxs = torch.zeros(len(_MAXS), dtype=torch.float64)

    def _add(self, key: str, value: float) -> None:
        self.sums[_SUMS.index(key)] += value

    def _max(self, key: str, value: float) -> None:
        i = _MAXS.index(key)
        self.maxs[i] = max(float(self.maxs[i]), value)

    def add_batch(self, loss_sum: float, correct: int, n: int, jac_sum: float = 0.0) -> None:
        self._add("loss", loss_sum)
        self._add("correct", correct)
        self._add("n", n)
        self._add("jac", jac_sum)

    def add_solves(self, model: nn.Module, *, backward: bool) -> None:
        """Record ``model.deq.last_info`` (forward solve, and derivative solves if ``backward``)."""
        deq = getattr(model, "deq", None)
        info = getattr(deq, "last_info", None)
        if info is None or info.forward is None:
            return
        f = info.forward
        self._add("fwd_iter", float(f.iterations.double().sum()))
        self._add("fwd_res", float(f.rel_residual.double().sum()))
        self._add("fwd_unconverged", float((~f.converged).sum()))
        self._max("fwd_iter_max", float(f.iterations.max()))
        self._max("fwd_res_max", float(f.rel_residual.max()))
        if backward:
            for d in info.derivatives:
                self._add("bwd_iter", float(d.iterations.double().sum()))
                self._add("bwd_n", float(d.iterations.numel()))
                self._max("bwd_iter_max", float(d.iterations.max()))

    def merge(self, other: "Meter") -> None:
        self.sums += other.sums
        self.maxs = torch.maximum(self.maxs, other.maxs)

    def reduce(self, ctx) -> "Meter":
        """A copy summed/maxed over the ranks of ``ctx`` (a ``DistContext``)."""
        out = Meter()
        out.sums, out.maxs = ctx.sum(self.sums.clone()), ctx.max(self.maxs.clone())
        return out

    def state(self) -> dict:
        return {"sums": self.sums.clone(), "maxs": self.maxs.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "Meter":
        m = cls()
        m.sums, m.maxs = state["sums"].clone(), state["maxs"].clone()
        return m

    def summary(self) -> dict:
        s = dict(zip(_SUMS, self.sums.tolist()))
        x = dict(zip(_MAXS, self.maxs.tolist()))
        n = max(s["n"], 1.0)
        out = {"loss": s["loss"] / n, "acc": s["correct"] / n, "samples": int(s["n"])}
        if s["fwd_iter"] or x["fwd_iter_max"] or s["fwd_res"]:
            out.update(
                fwd_iter_mean=s["fwd_iter"] / n, fwd_iter_max=int(x["fwd_iter_max"]),
                fwd_res_mean=s["fwd_res"] / n, fwd_res_max=x["fwd_res_max"],
                fwd_converged=1.0 - s["fwd_unconverged"] / n,
            )
        if s["bwd_n"]:
            out.update(bwd_iter_mean=s["bwd_iter"] / s["bwd_n"], bwd_iter_max=int(x["bwd_iter_max"]))
        if s["jac"]:
            out["jac_frobenius"] = s["jac"] / n
        return out
