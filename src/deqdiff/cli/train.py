"""``deqdiff train``: train a DEQ classifier (or its repeat-k counterpart) with checkpoints.

Runs data-parallel when launched by ``torchrun --nproc_per_node=N --no-python deqdiff train ...``:
each process trains on its shard of every global batch (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (add_run_flags, check_device, check_solver, config_defaults_help, disk_errors,
                      distributed_job, flag_of, float_list, given_settings, int_list, nonneg_float, out_dir,
                      positive_float, positive_int, resumed_settings, user_errors)


def _damping(s: str) -> float:
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


_damping.__name__ = "a number in (0, 1]"


def _branches(s: str) -> int:
    v = positive_int(s)
    if not 2 <= v <= 4:
        raise argparse.ArgumentTypeError(f"expected 2, 3 or 4 branches, got {s!r}")
    return v


def _unit_interval(s: str) -> float:
    v = nonneg_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {s!r}")
    return v


def _defaults():
    from ..training.config import TrainConfig

    return TrainConfig()


#: shows the ``TrainConfig`` default of each setting (the flags default to "not given")
_Help = config_defaults_help(_defaults, skip=("lr",))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a DEQ (conv, mon, mon-conv, mdeq) or repeat-k classifier on digits/MNIST/CIFAR-10",
        description=__doc__, formatter_class=_Help, argument_default=argparse.SUPPRESS,
    )
    # Settings default to "not given" (SUPPRESS), so that --resume can tell the flags given on
    # this command line from the checkpoint's own settings; TrainConfig supplies the defaults.
    g = p.add_argument_group("model")
    g.add_argument("--model", help="conv | repeat-K (e.g. repeat-6) | mon | mon-conv | mdeq (multiscale DEQ)")
    g.add_argument("--channels", type=positive_int, help="conv: state channels; mdeq: channels of the finest branch "
                   "(doubled per coarser branch)")
    g.add_argument("--hidden", type=positive_int, help="conv: hidden channels of W1; mdeq: of the finest branch's "
                   "block (doubled per branch)")
    g.add_argument("--branches", type=_branches, help="mdeq: resolutions, 2-4 (default: 4 for images of 32 px and "
                   "more, e.g. CIFAR-10; else 2)")
    g.add_argument("--dropout", type=_unit_interval, help="mdeq: variational dropout probability (one mask per solve)")
    g.add_argument("--groups", type=positive_int, help="conv, mdeq: group-norm groups")
    g.add_argument("--init-std", type=nonneg_float, help="conv, mdeq: std of the cell's weights")
    g.add_argument("--width", type=positive_int, help="monotone: state width/channels")
    g.add_argument("--mon-m", type=positive_float, help="monotone: margin m (I - W >= mI); default: the model's")
    g.add_argument("--mon-alpha", type=positive_float, help="monotone: splitting step size")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("digits", "mnist", "cifar10"), help="data set")
    g.add_argument("--data-dir", help="directory of the MNIST IDX files / CIFAR-10 python batches")
    g.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    g.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, help="global batch size (all processes)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer")
    g.add_argument("--lr", type=positive_float, help="default: 1e-3 (conv, repeat-K), 3e-3 (mon, mon-conv)")
    g.add_argument("--weight-decay", type=nonneg_float, help="L2 weight decay")
    g.add_argument("--scheduler", choices=("cosine", "none"), help="learning-rate schedule (per step)")
    g.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this")
    g.add_argument("--jac-reg", type=nonneg_float, help="weight of the Jacobian penalty ||J_f||_F^2/N")
    g.add_argument("--jac-reg-samples", type=positive_int, help="Hutchinson vectors per step")
    g = p.add_argument_group("equilibrium solve")
    g.add_argument("--solver", help="forward solver: anderson, broyden, fixed_point, newton_krylov; monotone models also pr/fb "
                   "(splitting; their default pr)")
    g.add_argument("--tol", type=positive_float, help="relative residual tolerance (default: the model's; conv 1e-2)")
    g.add_argument("--max-iter", type=positive_int, help="default: the model's (conv 50)")
    g.add_argument("--backward-tol", type=positive_float, help="tolerance of the implicit backward solves")
    g = p.add_argument_group("training tools (DEQ models)")
    g.add_argument("--grad", choices=("exact", "phantom"), help="backward mode: exact implicit gradients, or phantom "
                   "gradients (Geng et al. 2021: K damped unrolled steps from z*)")
    g.add_argument("--phantom-steps", type=positive_int, metavar="K", help="phantom gradients: unrolled steps K")
    g.add_argument("--phantom-damping", type=_damping, metavar="TAU", help="phantom gradients: damping TAU in (0, 1]")
    g.add_argument("--correction", type=int_list(positive_int), metavar="K1,K2,...", help="fixed-point correction (Bai et al. 2022): "
                   "comma-separated solver iterations whose states are also supervised, e.g. 4,8,12")
    g.add_argument("--correction-weights", type=float_list(nonneg_float), metavar="W1,W2,...",
                   help="loss weights of the --correction iterates (default 0.8^(n+1-i); final state 1)")
    g.add_argument("--cell-norm", choices=("none", "weight", "spectral"), help="normalize the cell's weights")
    g.add_argument("--compile", action="store_true", help="torch.compile the cell for the forward solve "
                   "(derivatives stay eager and exact)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="run directory (checkpoint.pt, metrics.json, training.png)")
    g.add_argument("--resume", action="store_true", default=False,
                   help="continue from OUT/checkpoint.pt with its settings (only the run controls "
                        "--max-steps, --device, --checkpoint-every, --data-dir, --no-progress may be given anew)")
    add_run_flags(g.add_argument, device="cpu, cuda, cuda:1, ...", dtype="parameters and states")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="autocast the cell to bfloat16, or float16 with loss scaling "
                   "(CUDA); the solver state and stopping rule stay float32")
    add_run_flags(g.add_argument, seed="seeds the model, the data order and the data split",
                  checkpoint_every="steps (0: every epoch)", max_steps="stop after this many steps in total",
                  no_progress=None)
    g.add_argument("--no-plots", action="store_true", default=False, help="skip OUT/training.png")
    p.set_defaults(func=_run)


_FIELDS = (
    "model", "channels", "hidden", "branches", "dropout", "groups", "init_std", "width", "mon_m", "mon_alpha", "data", "data_dir",
    "train_limit", "test_limit", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "scheduler",
    "grad_clip", "jac_reg", "jac_reg_samples", "solver", "tol", "max_iter", "backward_tol", "out", "device",
    "dtype", "amp", "seed", "checkpoint_every", "max_steps",
    "grad", "phantom_steps", "phantom_damping", "correction", "correction_weights", "cell_norm", "compile",
)


def _config(args: argparse.Namespace):
    """The run's ``TrainConfig``: the flags given, over the checkpoint's settings with
    ``--resume`` (a changed setting that would break the continuation is refused)."""
    from ..training import TrainConfig, read_checkpoint
    from ..training.trainer import RESUMABLE_CHANGES

    given = given_settings(args, _FIELDS)
    if not args.resume:
        with user_errors():
            return TrainConfig(**given, progress=not args.no_progress), None
    saved, ckpt = resumed_settings(
        args.out, given, read_checkpoint, RESUMABLE_CHANGES,
        note=f" (only {', '.join(flag_of(k) for k in sorted(RESUMABLE_CHANGES - {'progress'}))} and --no-progress may change)")
    with user_errors("--resume"):
        # run controls not given: no step limit; the run's own device, cadence and data folder
        config = TrainConfig.from_dict({**saved, "max_steps": None, **given, "out": args.out,
                                        "progress": not args.no_progress})
    return config, ckpt


def _setup(args: argparse.Namespace, ctx):
    """Everything that can fail on bad input, before training: config, device, solver,
    output folder, checkpoint, data and a trial build of the model."""
    from ..data import load_dataset
    from ..training import build_model, model_kind

    config, ckpt = _config(args)
    check_device(config.device)
    check_solver(config.solver, extra=("pr", "fb", "forward_backward", "peaceman_rachford")
                 if config.model.startswith("mon") else ())
    if ctx.is_main:
        out_dir(config.out)
    with user_errors(f"--data {config.data}", kinds=(ValueError, TypeError, OSError, ImportError)):
        data = load_dataset(config.data, config.data_dir, seed=config.seed, test_fraction=config.test_fraction)
    with user_errors("--model"):
        model_kind(config.model)
    with user_errors(f"--model {config.model}: cannot build it"):
        build_model(config, data.image_shape, data.num_classes)  # e.g. --channels not divisible by --groups
    return config, ckpt, data


def _run(args: argparse.Namespace) -> int:
    import json

    from ..training import train

    with distributed_job(getattr(args, "device", "cpu")) as ctx:
        config, ckpt, data = _setup(args, ctx)
        if ckpt is not None and ctx.is_main:
            print(f"resuming from {ckpt}")
        with disk_errors(config.out):
            result = train(config, data, resume=ckpt is not None)
        if ctx.is_main:
            final = result.final
            summary = {"out": str(result.out), "steps": result.steps, "final": final}
            if not args.no_plots and result.history.get("epochs"):
                from ..training.plots import plot_training_curves

                summary["figure"] = str(plot_training_curves(result.history, Path(result.out) / "training.png",
                                                             title=f"deqdiff train --model {config.model}"))
            print(json.dumps(summary, indent=1))
        return 0
