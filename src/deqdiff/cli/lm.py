"""``deqdiff lm``: train a character-level DEQ-Transformer language model (Bai, Kolter & Koltun
2019) on the ``help()`` documentation CPython ships (or ``--text FILE``), and optionally its
weight-tied unrolled counterpart at equal depth.

Reports bits per character on the held-out split, forward/backward solver iterations, peak
training memory (growth of the resident set) and time per epoch; writes ``results.json``,
``loss_curves.png``, ``metrics.json`` and ``checkpoint.pt`` (``--resume`` continues bit-exactly)
into ``--out``. With ``--compare`` each model trains in its own process (so their memory is
measured alike) into ``OUT/deq`` and ``OUT/unrolled-L``, L = ``--unrolled-depth`` or the DEQ's
mean forward iterations rounded up. Data-parallel under ``torchrun --nproc_per_node=N
--no-python deqdiff lm ...`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ._common import (UsageError, add_run_flags, check_solver, config_defaults_help, disk_errors, distributed_job,
                      flagged, given_settings, nonneg_float, one_line, optional, out_dir, positive_float, positive_int,
                      resumed_settings, set_threads, user_errors)

#: LMConfig fields set from flags of the same name
_FIELDS = ("model", "d_model", "n_heads", "d_ff", "init_std", "text", "seq_len", "train_windows", "valid_windows",
           "epochs", "batch_size", "eval_batch_size", "lr", "weight_decay", "grad_clip", "scheduler", "solver", "tol",
           "max_iter", "backward_solver", "backward_tol", "backward_max_iter", "backward_history", "recompute_linearization", "seed", "dtype", "checkpoint_every",
           "max_steps", "trace_memory")


_opt_int = optional(positive_int, ("none", "all"), "an integer ≥ 1 or 'all'")


def _defaults():
    from ..training.lm import LMConfig

    return LMConfig()


#: shows each setting's ``LMConfig`` default (the flags default to "not given" for --resume)
_Help = config_defaults_help(_defaults)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm", help="character-level DEQ-Transformer language model (vs its unrolled counterpart)",
                       description=__doc__, formatter_class=_Help, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="deq | unrolled-L (the same cell applied L times, backpropagated; e.g. unrolled-8)")
    g.add_argument("--d-model", type=positive_int, help="width of the hidden sequence")
    g.add_argument("--n-heads", type=positive_int, help="attention heads (must divide --d-model)")
    g.add_argument("--d-ff", type=positive_int, help="hidden width of the feed-forward block")
    g.add_argument("--init-std", type=nonneg_float, help="std of the cell's weights at initialization")
    g = p.add_argument_group("data")
    g.add_argument("--text", help="a UTF-8 text file (default: the help() topics of this Python, pydoc_data)")
    g.add_argument("--seq-len", type=positive_int, help="characters per training window")
    g.add_argument("--train-windows", type=_opt_int, help="training windows, evenly spaced over the split ('all': every one)")
    g.add_argument("--valid-windows", type=_opt_int, help="validation windows evaluated after each epoch ('all')")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, help="passes over the training windows")
    g.add_argument("--batch-size", type=positive_int, help="windows per step (global, all processes)")
    g.add_argument("--eval-batch-size", type=positive_int, help="windows per evaluation batch")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (cosine-annealed per step)")
    g.add_argument("--weight-decay", type=nonneg_float, help="L2 weight decay")
    g.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this")
    g.add_argument("--scheduler", choices=("cosine", "none"), help="learning-rate schedule")
    g = p.add_argument_group("equilibrium solve (deq)")
    g.add_argument("--solver", help="forward solver: anderson, broyden, fixed_point, newton_krylov")
    g.add_argument("--tol", type=positive_float, help="relative residual tolerance of the forward solve")
    g.add_argument("--max-iter", type=positive_int, help="forward iterations at most")
    g.add_argument("--backward-solver", help="solver of the implicit backward (auto, richardson, gmres, anderson, …)")
    g.add_argument("--backward-tol", type=positive_float, help="tolerance of the backward solves (default: --tol)")
    g.add_argument("--backward-max-iter", type=positive_int, help="backward iterations at most")
    g.add_argument("--backward-history", type=positive_int, help="Anderson's memory m on the backward (--backward-solver anderson)")
    g.add_argument("--recompute-linearization", action=argparse.BooleanOptionalAction,
                   help="the backward solve holds no vjp graph of the cell and evaluates the cell again at each "
                        "iteration (less memory, about one more cell evaluation per backward iteration)")
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", action="store_true", default=False,
                   help="train the DEQ and its unrolled counterpart, each in its own process, and compare")
    g.add_argument("--unrolled-depth", type=positive_int, default=None,
                   help="--compare: depth L of the unrolled model (default: the DEQ's mean forward iterations, rounded up)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/lm", help="output folder")
    g.add_argument("--resume", action="store_true", default=False,
                   help="continue from OUT/checkpoint.pt (with --compare: from the checkpoints in OUT/deq, OUT/unrolled-L) "
                        "with its settings; only --max-steps, --checkpoint-every, --text, --trace-memory and --no-progress may be given anew")
    add_run_flags(g.add_argument, dtype="parameters and states", seed="seeds the model and the data order",
                  checkpoint_every="steps (0: every epoch)")
    g.add_argument("--max-steps", type=_opt_int, help="stop after this many steps in total ('all': no limit)")
    add_run_flags(g.add_argument, threads=None)
    g.add_argument("--trace-memory", action="store_true",
                   help="also count each step's tensor memory: peak live tensor bytes of forward + backward and the "
                        "bytes saved for backward (deqdiff.training.memtrace), besides the resident set")
    add_run_flags(g.add_argument, no_progress=None)
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace, out: Path, model: str | None = None, resume: bool = False):
    """The ``LMConfig`` of the flags given (over the checkpoint's settings with ``--resume``)."""
    from ..training import read_checkpoint
    from ..training.lm import LM_FORMAT, LM_RESUMABLE, LMConfig

    given = given_settings(args, _FIELDS)
    if model is not None:
        given["model"] = model
    if not resume:
        try:
            return LMConfig(**given, out=str(out), progress=not args.no_progress), None
        except ValueError as err:
            raise flagged(err, _FIELDS) from err
    saved, ckpt = resumed_settings(
        out, given, lambda path: read_checkpoint(path, format=LM_FORMAT), LM_RESUMABLE,
        note=" (only --max-steps, --checkpoint-every, --text, --trace-memory and --no-progress may change)")
    with user_errors("--resume"):
        return LMConfig.from_dict({**saved, "max_steps": None, **given, "out": str(out),
                                   "progress": not args.no_progress}), ckpt


def _check(config, args):
    """Bad input found before training: solver names, text file, window sizes."""
    from ..data.text import load_corpus
    from ..solvers import available_solvers

    check_solver(config.solver)
    if config.backward_solver != "auto" and config.backward_solver not in available_solvers("linear"):
        raise UsageError(f"--backward-solver {config.backward_solver}: unknown linear solver; choose auto or one of "
                         f"{', '.join(sorted(available_solvers('linear')))}")
    with user_errors(f"--text {config.text}" if config.text else "--text"):
        corpus = load_corpus(config.text)
    with user_errors("--seq-len"):
        for split in ("train", "valid", "test"):
            corpus.windows(split, config.seq_len)
    return corpus


def _run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    with distributed_job("cpu") as ctx:
        if args.compare:
            if ctx.active:
                raise UsageError("--compare: run the comparison in one process (it starts its own per model), not under torchrun")
            if hasattr(args, "model"):
                raise UsageError("--compare trains both models; leave out --model (use --unrolled-depth for L)")
            return _compare(args)
        if args.unrolled_depth is not None:
            raise UsageError("--unrolled-depth is for --compare; train one unrolled model with --model unrolled-L")
        out = Path(args.out).expanduser()
        config, ckpt = _config(args, out, resume=args.resume)
        corpus = _check(config, args)
        if ctx.is_main:
            out_dir(out)
        result = _train(config, corpus, ckpt is not None)
        if ctx.is_main:
            summary = _summary(result)
            _write(out, {"model": summary}, [summary])
            print(json.dumps({k: summary[k] for k in ("model", "test_bpc", "steps", "peak_rss_above_start_mib",
                                                        "time_per_epoch_s")}, indent=1))
        return 0


def _train(config, corpus, resume: bool):
    from ..training.lm import train_lm

    try:
        with disk_errors(config.out):
            return train_lm(config, corpus, resume=resume)
    except ValueError as err:  # a checkpoint that does not fit this run (other text); bugs propagate
        if str(err).startswith("cannot resume"):
            raise UsageError(f"--resume: {one_line(err)}") from err
        raise


def _summary(result) -> dict:
    """The figures of one trained model (``LMResult``) for results.json."""
    from ..training.models import count_parameters

    h, epochs = result.history, result.history.get("epochs", [])
    steps = h.get("steps", [])
    fwd = [s["fwd_iter_mean"] for s in steps if "fwd_iter_mean" in s]
    out = {
        "model": result.config.model, "parameters": count_parameters(result.model), "steps": result.steps,
        "test_bpc": (result.test or {}).get("bpc"), "test": result.test,
        "valid_bpc": [e["valid"]["bpc"] for e in epochs], "train_bpc": [e["train"]["bpc"] for e in epochs],
        "time_per_epoch_s": (sum(e["time_s"] for e in epochs) / len(epochs)) if epochs else None,
        "peak_rss_above_start_mib": h.get("memory", {}).get("peak_rss_above_start_mib"),
        "memory": h.get("memory"),
        "step_bpc": [s["bpc"] for s in steps],
        "config": result.config.to_dict(),
    }
    if fwd:
        out.update(fwd_iter_mean=sum(fwd) / len(fwd), fwd_iter_max=max(s["fwd_iter_max"] for s in steps),
                   fwd_unconverged=sum(s["fwd_unconverged"] for s in steps))
        bwd = [s for s in steps if "bwd_iter_mean" in s]
        if bwd:
            out.update(bwd_iter_mean=sum(s["bwd_iter_mean"] for s in bwd) / len(bwd),
                       bwd_iter_max=max(s["bwd_iter_max"] for s in bwd),
                       bwd_unconverged=sum(s["bwd_unconverged"] for s in bwd))
    return out


def _child(config: dict, resume: bool, queue) -> None:
    """One model of ``--compare`` in a fresh process: its summary goes back through ``queue``."""
    import torch

    from ..data.text import load_corpus
    from ..training.lm import LMConfig, train_lm

    torch.set_num_threads(config.pop("_threads") or torch.get_num_threads())
    cfg = LMConfig.from_dict(config)
    try:
        result = train_lm(cfg, load_corpus(cfg.text), resume=resume)
        queue.put(("ok", _summary(result)))
    except BaseException as err:  # noqa: BLE001 — reported by the parent, then re-raised here
        queue.put(("error", f"{type(err).__name__}: {one_line(err)}"))
        raise


def _in_process(config, resume: bool, threads: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=({**config.to_dict(), "_threads": threads}, resume, queue))
    proc.start()
    kind, payload = queue.get()
    proc.join()
    if kind != "ok":
        raise RuntimeError(f"training {config.model} failed in its process: {payload}")
    return payload


def _compare(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    deq_cfg, deq_ckpt = _config(args, out / "deq", model="deq", resume=args.resume)
    _check(deq_cfg, args)
    out_dir(out)
    out_dir(out / "deq")
    deq = _in_process(deq_cfg, deq_ckpt is not None, args.threads)
    depth = args.unrolled_depth or max(1, math.ceil(deq["fwd_iter_mean"]))
    name = f"unrolled-{depth}"
    un_cfg, un_ckpt = _config(args, out / name, model=name, resume=args.resume and (out / name / "checkpoint.pt").is_file())
    out_dir(out / name)
    unrolled = _in_process(un_cfg, un_ckpt is not None, args.threads)
    cmp = {"depth": depth, "depth_rule": "--unrolled-depth" if args.unrolled_depth else
           "the DEQ's mean forward iterations over training, rounded up"}
    if deq["peak_rss_above_start_mib"] and unrolled["peak_rss_above_start_mib"]:
        cmp["memory_ratio_unrolled_over_deq"] = unrolled["peak_rss_above_start_mib"] / deq["peak_rss_above_start_mib"]
    tensor = [(r.get("memory") or {}).get("tensor_peak_mib") for r in (deq, unrolled)]
    if all(tensor):
        cmp["tensor_memory_ratio_unrolled_over_deq"] = tensor[1] / tensor[0]
    if deq["test_bpc"] is not None and unrolled["test_bpc"] is not None:
        cmp["bpc_difference_deq_minus_unrolled"] = deq["test_bpc"] - unrolled["test_bpc"]
        ratio = cmp.get("memory_ratio_unrolled_over_deq")
        cmp["target"] = "equal or better test bpc at >= 3x less training memory"
        cmp["target_met"] = bool(cmp["bpc_difference_deq_minus_unrolled"] <= 0 and ratio is not None and ratio >= 3)
        if "tensor_memory_ratio_unrolled_over_deq" in cmp:  # the same target on the tensor count
            cmp["target_met_tensor_memory"] = bool(cmp["bpc_difference_deq_minus_unrolled"] <= 0
                                                   and cmp["tensor_memory_ratio_unrolled_over_deq"] >= 3)
    if deq["time_per_epoch_s"] and unrolled["time_per_epoch_s"]:
        cmp["time_ratio_deq_over_unrolled"] = deq["time_per_epoch_s"] / unrolled["time_per_epoch_s"]
    _write(out, {"deq": deq, "unrolled": unrolled, "comparison": cmp}, [deq, unrolled])
    print(json.dumps({"deq_test_bpc": deq["test_bpc"], "unrolled_test_bpc": unrolled["test_bpc"], **cmp,
                      "deq_peak_rss_mib": deq["peak_rss_above_start_mib"],
                      "unrolled_peak_rss_mib": unrolled["peak_rss_above_start_mib"]}, indent=1))
    return 0


def _write(out: Path, results: dict, runs: list[dict]) -> None:
    """``results.json`` and ``loss_curves.png``: training bpc per step and validation bpc per epoch
    of each model; with two models a second panel shows their difference (first − second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    try:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        pair = len(runs) == 2
        fig, axes = plt.subplots(1, 2 if pair else 1, figsize=(11.5 if pair else 7.5, 4), squeeze=False)
        ax = axes[0][0]
        for r, style in zip(runs, ("-", "--")):
            steps = r["step_bpc"]
            line, = ax.plot(range(1, len(steps) + 1), steps, style, alpha=0.6, lw=0.9, label=f"{r['model']} train (per step)")
            per_epoch = len(steps) / max(len(r["valid_bpc"]), 1)
            ax.plot([per_epoch * (i + 1) for i in range(len(r["valid_bpc"]))], r["valid_bpc"], "o" + style, ms=6,
                    mfc="none" if style == "--" else None, color=line.get_color(), label=f"{r['model']} valid (per epoch)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("bits per character")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("character-level LM on " + ("the help() topics" if runs[0]["config"]["text"] is None
                                                  else Path(runs[0]["config"]["text"]).name))
        ax.legend(fontsize=8)
        if pair:
            a, b = runs
            ax = axes[0][1]
            n = min(len(a["step_bpc"]), len(b["step_bpc"]))
            ax.plot(range(1, n + 1), [x - y for x, y in zip(a["step_bpc"], b["step_bpc"])], lw=0.9,
                    label="train (per step)")
            per_epoch = n / max(len(a["valid_bpc"]), 1)
            ax.plot([per_epoch * (i + 1) for i in range(len(a["valid_bpc"]))],
                    [x - y for x, y in zip(a["valid_bpc"], b["valid_bpc"])], "o-", label="valid (per epoch)")
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"bpc of {a['model']} − bpc of {b['model']}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"difference: {a['model']} − {b['model']}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=120)
        plt.close(fig)
    except OSError as err:
        raise UsageError(f"--out {out}: {one_line(err)}") from err
