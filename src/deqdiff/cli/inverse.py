"""``deqdiff inverse deblur|denoise``: reconstruct images from noisy measurements with a deep
equilibrium network (Gilton, Ongie & Willett 2021) and with the same cell unrolled K steps.

Default data: scikit-learn digits, upsampled (bilinear) from 8×8 to 16×16 and scaled to [0, 1];
``--data mnist --data-dir DIR`` reads the MNIST IDX files from DIR (28×28 unless ``--size``).
Deblurring: 5×5 Gaussian blur (σ = 1 pixel) plus noise σ = 0.01; denoising: noise σ = 0.2.
Writes to ``--out``: results.json (PSNR of both models on the held-out split, PSNR with 2× and
4× the training iterations at test time, DEQ iterations and residuals, memory of a training
step, time per epoch), examples.png, psnr_vs_iterations.png, training.png and checkpoint.pt
(``--resume`` continues it bit-exactly). Runs data-parallel under
``torchrun --nproc_per_node=N --no-python deqdiff inverse ...`` (gloo on CPU).
"""

from __future__ import annotations

import argparse

from ._common import (UsageError, add_run_flags, check_device, check_solver, disk_errors, distributed_job, flag_of,
                      flagged, given_settings, nonneg_float, out_dir, positive_float, positive_int, resumed_settings,
                      set_threads, str_list, user_errors)

#: command-line flags ↔ InverseConfig fields (the flags default to "not given")
_FIELDS = ("data", "data_dir", "size", "train_limit", "test_limit", "noise", "blur_sigma", "blur_size", "form",
           "step_size", "tikhonov", "hidden", "init_std", "k", "models", "epochs", "batch_size", "lr", "grad_clip",
           "solver", "tol", "max_iter", "backward_solver", "backward_tol", "seed", "dtype", "device",
           "checkpoint_every", "max_steps")


def _size(text: str) -> int | None:
    if text.lower() == "native":
        return None
    v = positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 or 'native', got {text!r}")
    return v


_size.__name__ = "an image size"


def _odd(text: str) -> int:
    v = positive_int(text)
    if v % 2 != 1:
        raise argparse.ArgumentTypeError(f"expected an odd integer >= 1, got {text!r}")
    return v


_odd.__name__ = "an odd integer"


def _models(text: str) -> tuple[str, ...]:
    names = tuple(str_list(text))
    bad = [n for n in names if n not in ("deq", "unrolled")]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names among deq, unrolled, got {text!r}")
    return names


_models.__name__ = "a model list"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows the ``InverseConfig`` default of each setting (the flags default to "not given")."""

    def _get_help_string(self, action):
        from ..training.inverse import InverseConfig

        text = action.help or ""
        if action.default is argparse.SUPPRESS and hasattr(InverseConfig, action.dest):
            d = getattr(InverseConfig(), action.dest)
            if action.dest == "noise":
                return f"{text} (default: 0.01 deblur, 0.2 denoise)"
            if d is not None:
                return f"{text} (default: {','.join(d) if isinstance(d, tuple) else d})"
        return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inverse", help="inverse-problem DEQ vs unrolled network: deblurring / denoising images",
                       description=__doc__, formatter_class=_Help, argument_default=argparse.SUPPRESS)
    p.add_argument("task", choices=("deblur", "denoise"), help="deblur (Gaussian blur + noise) or denoise")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("digits", "mnist"), help="image set")
    g.add_argument("--data-dir", help="folder of the MNIST IDX files (--data mnist)")
    g.add_argument("--size", type=_size, help="resize images to SIZE×SIZE ('native': keep 8×8 digits / 28×28 MNIST)")
    g.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    g.add_argument("--test-limit", type=positive_int, help="use only the first N held-out images")
    g.add_argument("--noise", type=nonneg_float, help="measurement noise σ (images in [0, 1])")
    g.add_argument("--blur-sigma", type=positive_float, help="deblur: Gaussian kernel σ in pixels")
    g.add_argument("--blur-size", type=_odd, help="deblur: kernel size (odd)")
    g = p.add_argument_group("model")
    g.add_argument("--form", choices=("prox", "grad"),
                   help="prox: z ← R(z − η∇d(z)) (DE-Prox); grad: z ← z − η(∇d(z) + ε(z)) (DE-Grad)")
    g.add_argument("--step-size", type=positive_float, help="η of the data step")
    g.add_argument("--tikhonov", type=nonneg_float, help="μ: data fidelity ½‖Az − y‖² + (μ/2)‖z‖² (0: the paper's)")
    g.add_argument("--hidden", type=positive_int, help="channels of the denoiser CNN")
    g.add_argument("--init-std", type=nonneg_float, help="std of the denoiser's last convolution at start")
    g.add_argument("--k", type=positive_int, help="steps of the unrolled network")
    g.add_argument("--models", type=_models, help="which to train: deq, unrolled or both (comma-separated)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, help="passes over the training set (per model)")
    g.add_argument("--batch-size", type=positive_int, help="global batch size (all processes)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (cosine-annealed per step)")
    g.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this")
    g = p.add_argument_group("equilibrium solve")
    g.add_argument("--solver", help="forward solver: anderson, broyden, fixed_point, newton_krylov")
    g.add_argument("--tol", type=positive_float, help="relative residual tolerance of the forward solve")
    g.add_argument("--max-iter", type=positive_int, help="forward iterations at most (training budget)")
    g.add_argument("--backward-solver", help="linear solver of the implicit derivatives (gmres, auto, …)")
    g.add_argument("--backward-tol", type=positive_float, help="tolerance of the derivative solves")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default: runs/inverse_TASK)")
    g.add_argument("--resume", action="store_true", default=False,
                   help="continue from OUT/checkpoint.pt with its settings (only --max-steps, --device, "
                        "--checkpoint-every, --data-dir, --no-progress may be given anew)")
    add_run_flags(g.add_argument, device=None, dtype="parameters and images",
                  seed="seeds the models, the data order, the split and the noise",
                  checkpoint_every="also checkpoint every this many steps (0: epoch ends)",
                  max_steps="stop each model after this many steps ('none': no limit)", threads=None, no_progress=None)
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace):
    from pathlib import Path

    from ..training.inverse import RESUMABLE, InverseConfig, read_inverse_checkpoint

    given = given_settings(args, _FIELDS)
    out = Path(getattr(args, "out", f"runs/inverse_{args.task}"))
    if not args.resume:
        with user_errors():
            try:
                return InverseConfig(task=args.task, **given), out
            except ValueError as err:  # the message starts with the setting's name
                raise flagged(err, _FIELDS) from err
    given["task"] = args.task
    if "models" in given:
        given["models"] = list(given["models"])
    saved, _ = resumed_settings(out, given, read_inverse_checkpoint, RESUMABLE,
                                name=lambda k: "the task" if k == "task" else flag_of(k))
    with user_errors("--resume"):
        return InverseConfig.from_dict({**saved, "max_steps": None, **given}), out


def _run(args: argparse.Namespace) -> int:
    import json

    from ..training.inverse import load_task_data, train_inverse

    with distributed_job(getattr(args, "device", "cpu")) as ctx:
        config, out = _config(args)
        check_device(config.device)
        check_solver(config.solver)
        from ..solvers import available_solvers

        linear = sorted({*available_solvers("linear"), "auto"})
        if config.backward_solver not in linear:
            raise UsageError(f"--backward-solver {config.backward_solver}: unknown linear solver; choose one of "
                             f"{', '.join(linear)}")
        if ctx.is_main:
            out_dir(out)
        set_threads(args.threads)
        with user_errors(f"--data {config.data}", kinds=(ValueError, TypeError, OSError, ImportError)):
            data = load_task_data(config)
        if args.resume and ctx.is_main:
            print(f"resuming from {out / 'checkpoint.pt'}")
        with disk_errors(out):
            result = train_inverse(config, data, out=out, resume=args.resume, progress=not args.no_progress)
        if not ctx.is_main:
            return 0
        if not result.finished:
            print(json.dumps({"out": str(out), "steps": result.steps, "finished": False,
                              "note": "stopped by --max-steps; continue with --resume"}, indent=1))
            return 0
        _report(result, data, out)
        return 0


def _report(result, data, out) -> None:
    import json

    from ..training.inverse_report import assess, plot_examples, plot_psnr_curve, plot_training

    config = result.config
    report = assess(result, data)
    files = {"examples": out / "examples.png", "psnr_vs_iterations": out / "psnr_vs_iterations.png",
             "training": out / "training.png", "checkpoint": out / "checkpoint.pt", "results": out / "results.json"}
    plot_examples(result.models, data, config, files["examples"])
    plot_psnr_curve(report, config, files["psnr_vs_iterations"])
    plot_training(result.history, files["training"], config)
    payload = {"config": config.to_dict(), "report": report, "history": result.history,
               "files": {k: str(v) for k, v in files.items()}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(files["results"])
    _print_summary(report, config, files)


def _print_summary(report: dict, config, files: dict) -> None:
    print(f"\n{config.task} on {config.data} ({report['test_images']} held-out images): measurement "
          f"{report['measurement_psnr']:.2f} dB")
    for kind, e in report["models"].items():
        mem = e["step_memory"]
        line = (f"  {kind:8s} PSNR {e['psnr']:.2f} dB | " + ", ".join(
            f"{m}×: {v['psnr']:.2f}" for m, v in e["extra_iterations"].items() if m != "1")
            + f" dB | {e['time_per_epoch_s']:.1f} s/epoch | step memory saved {mem['saved_mib']:.1f} MiB, "
            f"peak {mem['peak_mib']:.1f} MiB")
        if kind == "deq":
            line += (f" | iterations {e['fwd_iter_mean']:.1f} (max {e['fwd_iter_max']}), residual max "
                     f"{e['fwd_res_max']:.1e}, converged {e['fwd_converged']:.0%}, ‖∂f/∂z‖ at z* ≤ "
                     f"{e['lipschitz_at_fixed_point']['max']:.3f}")
        print(line)
    for k, v in files.items():
        print(f"  {k}: {v}")
