"""Epoch time of the PIDEQ setup against an MLP PINN of equal parameter count, in one process.

    PYTHONPATH=src python benchmarks/bench_pideq_epoch.py                 # the full 2000 epochs of each
    PYTHONPATH=src python benchmarks/bench_pideq_epoch.py --quick         # smoke run

The setup is ``deqdiff pinn vdp --setup pideq`` (Pacheco & Camponogara 2022: Van der Pol, μ = 1,
1000 fresh collocation points per epoch, Adam, physics weight 0.1, Jacobian penalty κ = 1,
tol 1e-4): the implicit PIDEQ (80 states, 6724 parameters) with each forward solver named by
``--solvers``, and the MLP of 4 × 45 tanh units (6392 parameters). Every model trains its own
run from the same seed; the runs advance in turn, ``--block`` epochs at a time (round robin),
so that the shared machine's load drifts hit every model alike. Each epoch's CPU time
(``time.process_time``) and wall time are recorded; the table gives medians over all epochs,
over the first 300 (where the DEQ still needs more iterations) and over the rest, and the
ratio of each PIDEQ to the MLP. One thread. Results: ``benchmarks/results/pideq_epoch.json``
with the machine-speed reference (ms of one 2000 × 128 tanh layer) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import harness


def build(model: str, solver: str | None, epochs: int):
    from deqdiff.physics.vdp import VdPConfig, build_trainer

    overrides = dict(model=model, epochs=epochs)
    if model == "mlp":
        overrides["width"] = 45
    else:
        overrides["solver"] = solver
    return build_trainer(VdPConfig.for_setup("pideq", **overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--block", type=int, default=50, help="epochs per model per round")
    ap.add_argument("--solvers", nargs="+", default=["fixed_point", "auto", "anderson"])
    ap.add_argument("--quick", action="store_true", help="60 epochs in blocks of 20")
    ap.add_argument("--out", default=str(harness.RESULTS / "pideq_epoch.json"))
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.block = 60, 20
    torch.set_num_threads(1)
    runs = {"mlp-4x45": build("mlp", None, args.epochs)}
    for s in args.solvers:
        runs[f"pideq-{s}"] = build("pideq", s, args.epochs)
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    machine_ms = harness.tanh_layer_ms(30, warmup=5)

    def advance(name: str):
        def run(_: int) -> None:
            tr = runs[name]
            for _ in range(min(args.block, args.epochs - len(cpu[name]))):
                c, w = time.process_time(), time.perf_counter()
                tr.step()
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - w)
        return run

    rounds = -(-args.epochs // args.block)
    harness.round_robin({k: advance(k) for k in runs}, rounds)
    split = min(300, args.epochs // 2)

    def med(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3 if xs else float("nan")

    rows, out = [], {}
    base = {part: med(sel(cpu["mlp-4x45"])) for part, sel in
            (("all", lambda x: x), ("early", lambda x: x[:split]), ("late", lambda x: x[split:]))}
    for name, tr in runs.items():
        rec = dict(cpu_ms_median=med(cpu[name]), wall_ms_median=med(wall[name]),
                   cpu_ms_median_early=med(cpu[name][:split]), cpu_ms_median_late=med(cpu[name][split:]),
                   cpu_s_total=sum(cpu[name]), parameters=sum(p.numel() for p in tr.model.parameters()),
                   final_loss=tr.history[-1]["total"], iters_mean_last=tr.history[-1].get("iters_mean"))
        rec["ratio_to_mlp"] = rec["cpu_ms_median"] / base["all"]
        rec["ratio_to_mlp_early"] = rec["cpu_ms_median_early"] / base["early"]
        rec["ratio_to_mlp_late"] = rec["cpu_ms_median_late"] / base["late"]
        out[name] = rec
        rows.append([name, rec["parameters"], f"{rec['cpu_ms_median']:.1f}", f"{rec['wall_ms_median']:.1f}",
                     f"{rec['ratio_to_mlp']:.2f}×", f"{rec['ratio_to_mlp_early']:.2f}× / {rec['ratio_to_mlp_late']:.2f}×",
                     f"{rec['final_loss']:.3e}"])
    table = harness.markdown_table(["model", "parameters", "CPU ms/epoch (median)", "wall ms/epoch (median)",
                                    "÷ MLP (CPU)", f"÷ MLP first {split} / rest", "final loss"], rows)
    print(table)
    print(f"machine: {machine_ms:.2f} ms per 2000 × 128 tanh layer")
    harness.write_json(args.out, dict(command="python benchmarks/bench_pideq_epoch.py" + (" --quick" if args.quick else ""),
                                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), epochs=args.epochs,
                                      block=args.block, machine_ms=machine_ms, runs=out, table=table,
                                      machine=harness.machine_info("torch", "threads", "load_average", "summary")))


if __name__ == "__main__":
    main()
