"""The measurement harness shared by the benchmark scripts in this folder.

Every ``bench_*.py`` script times steps, measures the peak resident memory of a step, runs
configurations in fresh interpreters, records the machine and writes JSON and markdown tables.
This module does each of those once:

* time: :func:`repeat_times` / :func:`median_time` (wall clock, optional warm-up, time budget,
  CUDA synchronisation), :func:`interleaved_times` / :func:`round_robin` (several variants
  timed in turn, round by round, so that a shared machine's load drifts hit every variant
  alike), :func:`tanh_layer_ms` (a one-line machine-speed reference);
* memory: :func:`current_rss_mib`, :func:`peak_rss_mib`, :func:`reset_peak_rss` and
  :func:`peak_rss_growth` / :func:`peak_memory_growth` (how far one call raises the peak);
  :func:`measure_step` (a worker's record of one step: its peak growth, then timed repeats);
* isolation: :func:`run_isolated` runs a command in a fresh process (its output, wall time and
  peak RSS), :func:`call_isolated` runs a module-level function of a benchmark script in a fresh
  interpreter and returns its JSON result, :func:`run_cli` runs ``deqdiff`` the same way;
* records: :func:`machine_info`, :func:`write_json`, :func:`markdown_table`, :func:`markdown_row`.

Peak memory is read from ``VmHWM`` of ``/proc/self/status``, not from ``ru_maxrss``: on Linux
``ru_maxrss`` survives ``exec``, so a worker started from a process that once held 600 MiB
reports at least 600 MiB whatever it does itself; ``VmHWM`` is the worker's own high-water mark
and ``/proc/self/clear_refs`` can reset it (Linux ≥ 4.0). The peak RSS that :func:`run_isolated`
reports for a child comes from ``os.wait4`` (its ``ru_maxrss``), so it carries that floor: the
parent's peak at the time of the spawn.

A new benchmark script imports this module (``sys.path`` holds the script's folder when it runs
as ``python benchmarks/bench_x.py``) and keeps only what it measures::

    import harness

    def worker(spec: dict) -> dict:           # module level: runs in a fresh interpreter
        step = build_step(spec)
        growth = harness.peak_rss_growth(step)
        times = harness.repeat_times(step, spec["repeats"], warmup=1)
        return {"peak_mib": growth.peak_mib, "median_s": statistics.median(times)}

    result = harness.call_isolated(worker, {"repeats": 5}, env={"OMP_NUM_THREADS": "1"}).data
    harness.write_json(path, {"machine": harness.machine_info(), "result": result})
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deqdiff.training.memtrace import _status_mib, current_rss_mib, peak_rss_mib, reset_peak_rss  # noqa: F401

__all__ = [
    "ROOT", "RESULTS", "MARK", "LIVE_RSS_ENV", "sync", "timed", "repeat_times", "median_time", "round_robin",
    "interleaved_times", "tanh_layer_ms", "current_rss_mib", "peak_rss_mib", "reset_peak_rss", "PeakGrowth",
    "peak_rss_growth", "peak_memory_growth", "measure_step", "IsolatedRun", "IsolatedRunError", "child_env", "run_isolated",
    "call_isolated", "run_cli", "emit", "machine_info", "write_json", "markdown_row", "markdown_table",
]

T = TypeVar("T")

#: the repository root and the folder of the committed results
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: prefix of the stdout line that carries a worker's JSON result (other output may precede it)
MARK = "@@RESULT@@"
#: glibc settings under which RSS follows the bytes of live tensors: every block of 64 KiB or
#: more is its own ``mmap``, unmapped when freed, and freed heap is trimmed at once
LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# --------------------------------------------------------------------------- time


def sync(device: Any = None) -> None:
    """Wait for queued CUDA work when ``device`` is a CUDA device (else nothing)."""
    if device is None:
        return
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall-clock seconds (``time.perf_counter``) of one call ``fn()``, CUDA synchronised before
    and after when ``device`` is a CUDA device; the result of ``fn`` is dropped at once."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    del out
    return dt


def repeat_times(fn: Callable[[], Any], repeats: int, *, warmup: int = 0, budget_s: float | None = None,
                 min_repeats: int = 3, device: Any = None, collect: bool = False) -> list[float]:
    """Wall-clock times (s) of up to ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls.

    ``budget_s``: stop early once the timed calls have taken more than this many seconds in all
    and at least ``min_repeats`` were timed. ``collect``: ``gc.collect()`` before each timed call
    (outside the timing). ``device``: see :func:`timed`.

    Raises ``ValueError`` if ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    for _ in range(warmup):
        timed(fn, device)
    times: list[float] = []
    for _ in range(repeats):
        if collect:
            gc.collect()
        times.append(timed(fn, device))
        if budget_s is not None and sum(times) > budget_s and len(times) >= min_repeats:
            break
    return times


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, **options: Any) -> float:
    """Median wall-clock seconds of ``fn()`` over :func:`repeat_times` (same options)."""
    return statistics.median(repeat_times(fn, repeats, warmup=warmup, **options))


def round_robin(calls: Mapping[str, Callable[[int], T]], rounds: int, *, warmup: int = 0,
                budget_s: float | None = None, min_rounds: int = 3) -> dict[str, list[T]]:
    """Call every ``calls[name](i)`` in turn, round by round, and collect the results per name.

    ``i`` counts the rounds from 0, the ``warmup`` rounds first (their results are dropped), so a
    call can pick the round's batch. ``budget_s``: stop after a round once the timed rounds have
    taken more than this many seconds and at least ``min_rounds`` were done.

    Raises ``ValueError`` if ``calls`` is empty or ``rounds`` < 1.
    """
    if not calls:
        raise ValueError("round_robin needs at least one call")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    out: dict[str, list[T]] = {name: [] for name in calls}
    t0 = None
    for i in range(warmup + rounds):
        if i == warmup:
            t0 = time.perf_counter()
        for name, call in calls.items():
            res = call(i)
            if i >= warmup:
                out[name].append(res)
        done = i - warmup + 1
        if budget_s is not None and t0 is not None and done >= min_rounds and time.perf_counter() - t0 > budget_s:
            break
    return out


def interleaved_times(calls: Mapping[str, Callable[[int], Any]], rounds: int, *, warmup: int = 1,
                      device: Any = None, collect: bool = False, budget_s: float | None = None,
                      min_rounds: int = 3) -> dict[str, list[float]]:
    """Wall-clock times (s) of ``calls[name](i)``, timed in turn round by round (see
    :func:`round_robin`), so that the machine's load changes hit every variant alike.
    ``collect``: ``gc.collect()`` before each timed call (outside the timing)."""

    def timer(call: Callable[[int], Any]) -> Callable[[int], float]:
        def run(i: int) -> float:
            if collect:
                gc.collect()
            return timed(lambda: call(i), device)
        return run

    return round_robin({name: timer(call) for name, call in calls.items()}, rounds, warmup=warmup,
                       budget_s=budget_s, min_rounds=min_rounds)


def tanh_layer_ms(repeats: int = 200, warmup: int = 20) -> float:
    """Machine-speed reference: median milliseconds of one ``tanh(x Wᵀ + b)`` layer with
    x (2000, 128), W (128, 128), float32, in this process's torch threads."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(2000, 128, generator=g), torch.randn(128, 128, generator=g), torch.randn(128, generator=g)
    return 1e3 * statistics.median(repeat_times(lambda: torch.tanh(x @ W.T + b), repeats, warmup=warmup))


# --------------------------------------------------------------------------- memory


@dataclass
class PeakGrowth:
    """How far one call raised the peak memory (all figures in MiB; ``seconds``: its wall time).

    ``before_mib``/``after_mib``: the high-water mark before and after the call (CPU: ``VmHWM``,
    reset first where the kernel allows, ``reset``); ``rss_before_mib``: the RSS before it."""

    peak_mib: float
    seconds: float
    method: str
    before_mib: float | None = None
    after_mib: float | None = None
    rss_before_mib: float | None = None
    reset: bool | None = None

    def to_json(self) -> dict:
        """The record the benchmark JSON files hold under ``"memory"``."""
        if self.before_mib is None:
            return {"peak_mib": self.peak_mib, "method": self.method, "first_step_s": self.seconds}
        return {"peak_mib": self.peak_mib, "maxrss_before_mib": self.before_mib, "rss_before_mib": self.rss_before_mib,
                "maxrss_after_mib": self.after_mib, "hiwater_reset": self.reset, "method": self.method,
                "first_step_s": self.seconds}


def peak_rss_growth(fn: Callable[[], Any]) -> PeakGrowth:
    """Run ``fn()`` once and measure how far it raised this process's resident peak (MiB):
    ``gc.collect()``, high-water mark reset to the current RSS, the call, the rise of the mark.

    Run it in a fresh process after a warm-up call (imports, kernels and allocator pools would
    otherwise count), e.g. inside a worker of :func:`call_isolated`. Without a reset (no
    ``/proc/self/clear_refs``) the figure is the rise above the process's earlier peak, which
    may be less than the call's own."""
    gc.collect()
    reset = reset_peak_rss()
    rss0, before = current_rss_mib(), peak_rss_mib()
    dt = timed(fn)
    after = peak_rss_mib()
    method = "VmHWM difference" if _status_mib("VmHWM") is not None else "ru_maxrss difference"
    return PeakGrowth(after - before, dt, method, before, after, rss0, reset)


def peak_memory_growth(fn: Callable[[], Any], device: Any = "cpu") -> PeakGrowth:
    """:func:`peak_rss_growth` on CPU; on CUDA the rise of ``torch.cuda.max_memory_allocated``
    above the memory allocated before the call (peak statistics reset first)."""
    import torch

    if torch.device(device).type != "cuda":
        return peak_rss_growth(fn)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dt = timed(fn, device)
    return PeakGrowth((torch.cuda.max_memory_allocated() - before) / 2**20, dt, "cuda.max_memory_allocated")


def measure_step(step: Callable[[dict], Any], repeats: int, *, device: Any = "cpu", budget_s: float | None = None,
                 memory_only: bool = False) -> dict:
    """What a fresh-process worker measures of one training/derivative step ``step(stats)``
    (``stats``: a dict the step may fill, e.g. with solver iterations), after its warm-up:

    ``memory``: :func:`peak_memory_growth` of the first call (:meth:`PeakGrowth.to_json`);
    ``stats``: what that call put in its dict; ``times_s``/``median_s``: :func:`repeat_times` of
    up to ``repeats`` more calls (``budget_s``, ``gc.collect()`` before each; left out with
    ``memory_only``); ``warnings``: the distinct messages of the warnings raised meanwhile.
    """
    stats: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: dict = {"memory": peak_memory_growth(lambda: step(stats), device).to_json(), "stats": stats}
        if not memory_only:
            times = repeat_times(lambda: step({}), repeats, budget_s=budget_s, device=device, collect=True)
            out.update(times_s=times, median_s=statistics.median(times))
    out["warnings"] = sorted({str(w.message) for w in caught})
    return out


# --------------------------------------------------------------------------- fresh processes


class IsolatedRunError(RuntimeError):
    """A fresh-process run failed: non-zero exit, timeout or no result line. ``stderr`` holds the
    tail of its standard error, ``returncode`` its exit status (None after a timeout)."""

    def __init__(self, message: str, stderr: str = "", returncode: int | None = None):
        super().__init__(message)
        self.stderr, self.returncode = stderr, returncode


@dataclass
class IsolatedRun:
    """What :func:`run_isolated` brings back: ``data`` (the JSON of the ``MARK`` line, or None),
    the captured ``stdout``/``stderr`` ("" when not captured), ``wall_s`` and ``peak_rss_mib`` of the
    child (``ru_maxrss`` from ``os.wait4``: at least the parent's peak at the spawn)."""

    data: Any
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mib: float


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``src/`` first on ``PYTHONPATH`` (the checkout's
    ``deqdiff`` without installing it), updated by ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _result_line(stdout: str) -> Any:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):]) if lines else None


def run_isolated(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
                 cwd: str | Path | None = None, capture: bool = True, expect_result: bool = False) -> IsolatedRun:
    """Run ``argv`` in a fresh process (environment: :func:`child_env` updated by ``env``) and
    wait for it. ``capture``: collect stdout/stderr (through files, so large output cannot
    block) and parse the last line that starts with :data:`MARK` as JSON into ``data``;
    otherwise the child writes to this process's terminal. ``timeout``: seconds before the
    child is killed.

    Raises :class:`IsolatedRunError` on a non-zero exit, a timeout, or (``expect_result``) no
    result line; ``ValueError`` if ``argv`` is empty.
    """
    if not argv:
        raise ValueError("run_isolated needs a command")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        streams = {"stdout": out, "stderr": err} if capture else {}
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), env=child_env(env), cwd=cwd, text=True, **streams)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = (out.read(), err.read()) if capture else ("", "")
    name = " ".join(str(a) for a in argv[:3]) + (" …" if len(argv) > 3 else "")
    if killed.is_set() and proc.returncode < 0:  # killed by the timer, not finished just before it
        raise IsolatedRunError(f"timed out after {timeout}s", stderr[-3000:], None)
    if proc.returncode:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        raise IsolatedRunError(f"{name} failed with exit status {proc.returncode}: {last[-300:]}", stderr[-3000:],
                               proc.returncode)
    data = _result_line(stdout) if capture else None
    if expect_result and data is None:
        raise IsolatedRunError(f"{name} printed no {MARK} result line", stderr[-3000:], proc.returncode)
    return IsolatedRun(data, stdout, stderr, wall, usage.ru_maxrss / 1024)


def call_isolated(fn: Callable[..., Any], *args: Any, env: Mapping[str, str] | None = None,
                  timeout: float | None = None, cwd: str | Path | None = None, **kwargs: Any) -> IsolatedRun:
    """Run ``fn(*args, **kwargs)`` in a fresh interpreter and return its result in ``data``.

    ``fn`` must be a module-level function of a Python file (a benchmark script works: it is
    imported under its file name, so its ``if __name__ == "__main__"`` block does not run);
    the arguments and the result must be JSON values. ``env``, ``timeout``, ``cwd``: as in
    :func:`run_isolated`, whose errors this raises (``ValueError`` also for a lambda, a nested
    function or arguments that are no JSON).
    """
    qualname, path = getattr(fn, "__qualname__", ""), getattr(getattr(fn, "__code__", None), "co_filename", None)
    if not path or not Path(path).is_file() or "." in qualname or qualname == "<lambda>":
        raise ValueError(f"call_isolated needs a module-level function of a file, got {fn!r}")
    try:
        payload = json.dumps({"args": list(args), "kwargs": kwargs})
    except TypeError as e:
        raise ValueError(f"call_isolated arguments must be JSON values: {e}") from None
    argv = [sys.executable, str(Path(__file__).resolve()), "--call", str(Path(path).resolve()), fn.__name__, payload]
    return run_isolated(argv, env=env, timeout=timeout, cwd=cwd, expect_result=True)


def run_cli(args: Sequence[str], **options: Any) -> IsolatedRun:
    """``deqdiff ARGS`` in a fresh process (``python -m deqdiff.cli``); ``options`` as in
    :func:`run_isolated` (e.g. ``capture=False`` to let its progress through)."""
    return run_isolated([sys.executable, "-m", "deqdiff.cli", *args], **options)


def emit(result: Any) -> None:
    """Print ``result`` as the JSON result line of a worker (what :func:`run_isolated` parses)."""
    print(MARK + json.dumps(result), flush=True)


def _child_main(path: str, name: str, payload: str) -> None:
    """``python harness.py --call FILE FUNCTION JSON`` (what :func:`call_isolated` starts)."""
    file = Path(path)
    sys.path.insert(0, str(file.parent))
    module = importlib.import_module(file.stem)
    call = json.loads(payload)
    emit(getattr(module, name)(*call["args"], **call["kwargs"]))


# --------------------------------------------------------------------------- records


def machine_info(*fields: str, **renamed: str) -> dict[str, Any]:
    """Facts about this machine and process for a results file.

    Fields: ``python``, ``torch`` (versions), ``platform`` (``platform.platform()``), ``machine``
    (``platform.machine()``), ``processor``, ``cpus``, ``threads`` (torch's), ``omp_num_threads``
    (the variable, or None), ``load_average`` (1/5/15 min), ``summary`` ("x86_64, 2 CPU cores").
    Without arguments: all of them. ``machine_info("torch", "threads", load="load_average")``:
    those fields, in that order, the keyword ones under the keyword's name.

    Raises ``ValueError`` for an unknown field.
    """
    import torch

    known = {
        "python": platform.python_version, "torch": lambda: torch.__version__, "platform": platform.platform,
        "machine": platform.machine, "processor": lambda: platform.processor() or platform.machine(),
        "cpus": os.cpu_count, "threads": torch.get_num_threads,
        "omp_num_threads": lambda: os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg,
        "summary": lambda: f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    wanted = {f: f for f in fields} | renamed if fields or renamed else {f: f for f in known}
    unknown = sorted(set(wanted.values()) - set(known))
    if unknown:
        raise ValueError(f"unknown machine_info field(s) {unknown}; choose from {sorted(known)}")
    return {key: known[field]() for key, field in wanted.items()}


def write_json(path: str | Path, data: Any, *, indent: int = 1, newline: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` (folders created; ``newline``: end with a newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + ("\n" if newline else ""))
    return path


def markdown_row(cells: Sequence[Any]) -> str:
    """One markdown table row: ``| a | b |`` (an empty cell as ``| |``)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def markdown_table(columns: Sequence[Any], rows: Sequence[Sequence[Any]] = ()) -> str:
    """A markdown table: the header ``columns``, the ``|---|`` line, then ``rows`` (cells are
    written with ``str``; format numbers before).

    Raises ``ValueError`` if a row has more cells than there are columns.
    """
    for row in rows:
        if len(row) > len(columns):
            raise ValueError(f"a table row has {len(row)} cells for {len(columns)} columns: {list(row)!r}")
    return "\n".join([markdown_row(columns), "|" + "---|" * len(columns), *(markdown_row(r) for r in rows)])


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--call":
        sys.exit("usage: python benchmarks/harness.py --call FILE FUNCTION JSON (what call_isolated starts)")
    _child_main(*sys.argv[2:])
