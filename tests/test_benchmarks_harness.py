"""The benchmark harness (benchmarks/harness.py): timing statistics, tables, JSON, machine facts,
fresh-process runs and peak-RSS growth.

Kept light on purpose: several tests start fresh interpreters that import this file, so it
imports no torch at module level.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

LINUX_PROC = Path("/proc/self/status").exists()


# --------------------------------------------------------------------------- fresh-process workers
# module-level functions: call_isolated imports this file in a new interpreter and calls them


def _worker_echo(spec: dict, scale: int = 1) -> dict:
    return {"pid": os.getpid(), "doubled": [scale * 2 * x for x in spec["values"]], "note": spec["note"]}


def _worker_allocate(mib: int) -> dict:
    """Peak growth of touching ``mib`` MiB (bytes * n fills every page), and of doing nothing."""
    def allocate() -> None:
        block = b"\x01" * (mib * 2**20)
        del block

    grown = harness.peak_rss_growth(allocate)
    idle = harness.peak_rss_growth(lambda: None)
    return {"grown": grown.peak_mib, "idle": idle.peak_mib, "reset": grown.reset, "method": grown.method,
            "record": grown.to_json()}


def _worker_fail(message: str) -> None:
    raise RuntimeError(message)


def _worker_sleep(seconds: float) -> None:
    time.sleep(seconds)


# --------------------------------------------------------------------------- time


class FakeClock:
    """A perf_counter that only moves when a timed call says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", fake)
    return fake


def test_repeat_times_median_and_warmup(clock):
    durations = iter([100.0, 3.0, 1.0, 2.0, 9.0, 5.0])  # the first call is the warm-up
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(durations)

    times = harness.repeat_times(fn, 5, warmup=1)
    assert times == [3.0, 1.0, 2.0, 9.0, 5.0]
    assert len(calls) == 6
    durations = iter([100.0, 3.0, 1.0, 2.0, 9.0, 5.0])
    assert harness.median_time(fn, repeats=5, warmup=1) == 3.0  # the warm-up's 100 s is not counted


def test_repeat_times_budget_stops_after_min_repeats(clock):
    def fn():
        clock.now += 10.0

    assert len(harness.repeat_times(fn, 50, budget_s=1.0, min_repeats=3)) == 3
    assert len(harness.repeat_times(fn, 50, budget_s=1.0, min_repeats=1)) == 1
    assert len(harness.repeat_times(fn, 4)) == 4  # no budget: every repeat


@pytest.mark.parametrize("kwargs, match", [({"repeats": 0}, "repeats"), ({"repeats": 2, "warmup": -1}, "warmup")])
def test_repeat_times_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        harness.repeat_times(lambda: None, **kwargs)


def test_round_robin_order_and_round_index():
    order = []
    calls = {name: (lambda i, name=name: order.append((i, name)) or f"{name}{i}") for name in ("a", "b")}
    out = harness.round_robin(calls, 2, warmup=1)
    assert order == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]  # in turn, round by round
    assert out == {"a": ["a1", "a2"], "b": ["b1", "b2"]}  # the warm-up round's results dropped
    with pytest.raises(ValueError, match="at least one"):
        harness.round_robin({}, 3)


def test_interleaved_times_and_budget(clock):
    cost = {"slow": 2.0, "fast": 0.5}

    def call(name):
        def run(i):
            clock.now += cost[name] * (10 if i == 0 else 1)  # a slow first (warm-up) step
        return run

    times = harness.interleaved_times({n: call(n) for n in cost}, 4, warmup=1)
    assert times == {"slow": [2.0] * 4, "fast": [0.5] * 4}
    short = harness.interleaved_times({n: call(n) for n in cost}, 50, warmup=1, budget_s=1.0, min_rounds=3)
    assert {len(v) for v in short.values()} == {3}


def test_tanh_layer_ms_is_a_positive_time():
    ms = harness.tanh_layer_ms(repeats=3, warmup=1)
    assert 0 < ms < 10_000


# --------------------------------------------------------------------------- tables, JSON, machine


def test_markdown_table_exact_text():
    text = harness.markdown_table(["method", "time (s)", "note"], [["a", f"{1.23456:.2f}", ""], ["b", 7, "x"]])
    assert text == "| method | time (s) | note |\n|---|---|---|\n| a | 1.23 | |\n| b | 7 | x |"
    assert harness.markdown_table(["only"]) == "| only |\n|---|"
    assert harness.markdown_row(["", "y"]) == "| | y |"


def test_markdown_table_rejects_long_rows():
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        harness.markdown_table(["a", "b"], [[1, 2, 3]])


def test_write_json_creates_folders(tmp_path):
    data = {"rows": [1, 2.5, None], "name": "x"}
    path = harness.write_json(tmp_path / "deep" / "er" / "r.json", data)
    assert json.loads(path.read_text()) == data
    assert path.read_text() == json.dumps(data, indent=1)
    assert harness.write_json(tmp_path / "n.json", [1], indent=2, newline=True).read_text() == "[\n  1\n]\n"


def test_machine_info_fields_and_renames():
    import torch

    full = harness.machine_info()
    assert full["torch"] == torch.__version__ and full["cpus"] == os.cpu_count()
    assert full["threads"] == torch.get_num_threads() and len(full["load_average"]) == 3
    assert full["summary"].endswith(f"{os.cpu_count()} CPU cores")
    some = harness.machine_info("python", "torch", load="load_average")
    assert list(some) == ["python", "torch", "load"]
    with pytest.raises(ValueError, match="unknown machine_info field"):
        harness.machine_info("gpu_count")


# --------------------------------------------------------------------------- fresh processes


def test_call_isolated_returns_the_workers_json():
    run = harness.call_isolated(_worker_echo, {"values": [1, 2.5], "note": "é"}, scale=3)
    assert run.data == {"pid": run.data["pid"], "doubled": [6, 15.0], "note": "é"}
    assert run.data["pid"] != os.getpid()  # a different process
    assert run.wall_s > 0 and run.peak_rss_mib > 0


def test_call_isolated_rejects_what_cannot_run_elsewhere():
    with pytest.raises(ValueError, match="module-level function"):
        harness.call_isolated(lambda: 1)
    with pytest.raises(ValueError, match="JSON values"):
        harness.call_isolated(_worker_echo, {"values": {1, 2}, "note": ""})


def test_call_isolated_failure_and_timeout():
    with pytest.raises(harness.IsolatedRunError, match="exit status 1") as failed:
        harness.call_isolated(_worker_fail, "the worker's own message")
    assert failed.value.returncode == 1 and "the worker's own message" in failed.value.stderr
    with pytest.raises(harness.IsolatedRunError, match="timed out after 1.0s") as slow:
        harness.call_isolated(_worker_sleep, 30.0, timeout=1.0)
    assert slow.value.returncode is None


def test_run_isolated_reads_the_result_line_and_environment():
    code = ("import json, os; print('progress'); "
            f"print({harness.MARK!r} + json.dumps(os.environ['BENCH_HARNESS_TEST']))")
    run = harness.run_isolated([sys.executable, "-c", code], env={"BENCH_HARNESS_TEST": "seen"})
    assert run.data == "seen" and run.stdout.startswith("progress")
    assert harness.run_isolated([sys.executable, "-c", "pass"]).data is None
    with pytest.raises(harness.IsolatedRunError, match="no @@RESULT@@ result line"):
        harness.run_isolated([sys.executable, "-c", "pass"], expect_result=True)
    with pytest.raises(ValueError, match="needs a command"):
        harness.run_isolated([])


def test_child_env_puts_src_first():
    env = harness.child_env({"EXTRA": "1"})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(harness.ROOT / "src") and env["EXTRA"] == "1"


# --------------------------------------------------------------------------- memory


@pytest.mark.skipif(not LINUX_PROC, reason="VmHWM needs Linux /proc")
def test_peak_rss_growth_sees_an_allocation():
    res = harness.call_isolated(_worker_allocate, 64).data  # fresh process: a small, known baseline
    assert res["method"] == "VmHWM difference"
    if res["reset"]:
        assert 56 <= res["grown"] <= 128, res  # 64 MiB touched, freed again
        assert res["idle"] < 8, res
    else:  # no clear_refs: growth is above the process's earlier peak, still seen from a fresh one
        assert res["grown"] >= 32, res
    assert set(res["record"]) >= {"peak_mib", "maxrss_before_mib", "maxrss_after_mib", "hiwater_reset", "first_step_s"}


@pytest.mark.skipif(not LINUX_PROC, reason="VmHWM needs Linux /proc")
def test_peak_rss_is_not_inherited_from_the_parent():
    """ru_maxrss survives exec (a child reports its parent's peak); VmHWM is the child's own."""
    block = b"\x01" * (256 * 2**20)  # this process now peaks at least 256 MiB above a bare interpreter
    code = f"import sys; sys.path.insert(0, {str(harness.ROOT / 'benchmarks')!r}); import harness; " \
           "harness.emit(harness.peak_rss_mib())"
    run = harness.run_isolated([sys.executable, "-c", code])
    parent_peak = harness.peak_rss_mib()
    del block
    # the child's own peak (an interpreter with torch imported), not the parent's, which is the
    # same interpreter plus the 256 MiB block
    assert run.data < parent_peak - 128, (run.data, parent_peak)
    assert parent_peak >= 256
    assert harness.current_rss_mib() <= harness.peak_rss_mib()


def test_peak_memory_growth_on_cpu_is_rss_growth():
    growth = harness.peak_memory_growth(lambda: None, "cpu")
    assert growth.method in ("VmHWM difference", "ru_maxrss difference") and growth.seconds >= 0


def test_measure_step_record():
    import warnings

    calls = []

    def step(stats: dict) -> None:
        calls.append(1)
        stats["iterations"] = len(calls)
        warnings.warn("solver did not converge")

    rec = harness.measure_step(step, 2)
    assert rec["stats"] == {"iterations": 1}  # the first (memory) call's stats
    assert len(rec["times_s"]) == 2
    assert rec["median_s"] == pytest.approx(statistics.median(rec["times_s"]))
    assert rec["warnings"] == ["solver did not converge"] and len(calls) == 3
    assert {"peak_mib", "method", "first_step_s"} <= set(rec["memory"])
    only = harness.measure_step(step, 2, memory_only=True)
    assert "times_s" not in only and only["stats"] == {"iterations": 4} and len(calls) == 4


def test_benchmark_scripts_compile():
    """Every script in benchmarks/ is valid Python (they run only by hand, so CI sees them here)."""
    scripts = sorted((harness.ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 10
    for path in scripts:
        compile(path.read_text(), str(path), "exec")  # raises SyntaxError naming the file and line
