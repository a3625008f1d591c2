"""The runnable examples in examples/: each ``--quick`` run exits 0 and prints its key lines,
and the numbers the examples check (derivatives against finite differences, unrolled autodiff
or another solver) meet their tolerances.

The five scripts start together (one subprocess each, ``OMP_NUM_THREADS=1``) when the first
test runs, so the module costs about as long as the slowest one (most of it is importing torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["deq_layer", "physics_informed_by_hand", "hessian_spectrum", "monotone_deq", "custom_solver"]


@pytest.fixture(scope="module")
def runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in NAMES}
    done: dict[str, tuple[int, str, str]] = {}

    def result(name: str) -> tuple[int, str, str]:
        if name not in done:
            try:
                out, err = procs[name].communicate(timeout=600)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                out, err = procs[name].communicate()
            done[name] = (procs[name].returncode, out, err)
        return done[name]

    yield result
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def run(runs, name: str) -> str:
    code, out, err = runs(name)
    assert code == 0, f"examples/{name}.py --quick exited with {code}:\n{out}\n{err[-3000:]}"
    return out


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def test_all_examples_are_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(NAMES)


def test_deq_layer(runs):
    out = run(runs, "deq_layer")
    assert re.search(r"forward: +forward solve \(auto\): \d+/\d+ rows converged", out)
    assert re.search(r"derivative: .*solve", out)
    # one epoch on 256 digits already learns something: well above chance (10 %)
    assert number(r"test accuracy ([\d.]+) %", out) > 20.0


def test_physics_informed_by_hand(runs):
    out = run(runs, "physics_informed_by_hand")
    assert number(r"dy/dt check: .*relative difference ([\d.e+-]+)", out) < 1e-6
    assert "step     0: physics loss" in out
    assert number(r"max \|y - y_solve_ivp\| on \[0, 2\]: ([\d.e+-]+)", out) >= 0.0


def test_hessian_spectrum(runs):
    out = run(runs, "hessian_spectrum")
    for term in ("total", "gauss_newton", "dynamics", "head"):
        assert re.search(rf"^  {term} +top-3 \[", out, re.M), term
    # the Gauss–Newton term is PSD for the (convex) cross-entropy: its smallest Ritz value is ≥ 0
    assert number(r"gauss_newton +top-3 \[.*\], smallest ([\d.e+-]+)", out) > -1e-8
    assert number(r"unrolled iterations: relative difference ([\d.e+-]+)", out) < 1e-6


def test_monotone_deq(runs):
    out = run(runs, "monotone_deq")
    for solver in ("pr", "fb"):  # splitting converges on every sample, guaranteed
        match = re.search(rf"^  {solver} +(\d+)/(\d+) converged", out, re.M)
        assert match and match.group(1) == match.group(2), out
    assert number(r"guaranteed contraction factor ([\d.]+)", out) < 1.0
    assert re.search(r"epoch 1: loss [\d.]+, mean PR iterations forward", out)
    assert "test accuracy" in out


def test_custom_solver(runs):
    out = run(runs, "custom_solver")
    assert re.search(r"^anderson1 +iterations: mean", out, re.M)
    assert number(r"anderson1 vs the built-in fixed_point: relative difference ([\d.e+-]+)", out) < 1e-6
    assert number(r"vs anderson: ([\d.e+-]+)", out) < 1e-6
    assert number(r"d²L/dA² v, anderson1 vs fixed_point: relative difference ([\d.e+-]+)", out) < 1e-6
