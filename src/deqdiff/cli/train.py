"""``deqdiff train``: train a DEQ classifier (or its repeat-k counterpart) with checkpoints.

Runs data-parallel when launched by ``torchrun --nproc_per_node=N --no-python deqdiff train ...``:
each process trains on its shard of every global batch (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse


def _opt_int(s: str) -> int | None:
    return None if s.lower() == "none" else int(s)


def register(sub: argparse._SubParsersAction) -> None:
    from ..training.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a DEQ (conv, mon, mon-conv) or repeat-k classifier on digits/MNIST/CIFAR-10",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="conv | repeat-K (e.g. repeat-6) | mon | mon-conv")
    g.add_argument("--channels", type=int, default=d.channels, help="conv: state channels")
    g.add_argument("--hidden", type=int, default=d.hidden, help="conv: hidden channels of W1")
    g.add_argument("--groups", type=int, default=d.groups, help="conv: group-norm groups")
    g.add_argument("--init-std", type=float, default=d.init_std, help="conv: std of the cell's weights")
    g.add_argument("--width", type=int, default=d.width, help="monotone: state width/channels")
    g.add_argument("--mon-m", type=float, default=None, help="monotone: margin m (I - W >= mI); default: the model's")
    g.add_argument("--mon-alpha", type=float, default=d.mon_alpha, help="monotone: splitting step size")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, choices=("digits", "mnist", "cifar10"))
    g.add_argument("--data-dir", default=None, help="directory of the MNIST IDX files / CIFAR-10 python batches")
    g.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    g.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    g.add_argument("--optimizer", default=d.optimizer, choices=("adam", "sgd"))
    g.add_argument("--lr", type=float, default=None, help="default: 1e-3 (conv, repeat-K), 3e-3 (mon, mon-conv)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--scheduler", default=d.scheduler, choices=("cosine", "none"))
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--jac-reg", type=float, default=d.jac_reg, help="weight of the Jacobian penalty ||J_f||_F^2/N")
    g.add_argument("--jac-reg-samples", type=int, default=d.jac_reg_samples, help="Hutchinson vectors per step")
    g = p.add_argument_group("equilibrium solve")
    g.add_argument("--solver", default=None, help="forward solver: anderson, broyden, fixed_point, newton_krylov; monotone models also pr/fb "
                   "(splitting; their default pr)")
    g.add_argument("--tol", type=float, default=None, help="relative residual tolerance (default: the model's; conv 1e-2)")
    g.add_argument("--max-iter", type=int, default=None, help="default: the model's (conv 50)")
    g.add_argument("--backward-tol", type=float, default=None)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="run directory (checkpoint.pt, metrics.json)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (its settings are kept)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    g.add_argument("--amp", default=None, choices=("bf16",), help="autocast the forward pass")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps (0: every epoch)")
    g.add_argument("--max-steps", type=_opt_int, default=None, help="stop after this many steps in total")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


_FIELDS = (
    "model", "channels", "hidden", "groups", "init_std", "width", "mon_m", "mon_alpha", "data", "data_dir",
    "train_limit", "test_limit", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "scheduler",
    "grad_clip", "jac_reg", "jac_reg_samples", "solver", "tol", "max_iter", "backward_tol", "out", "device",
    "dtype", "amp", "seed", "checkpoint_every", "max_steps",
)


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from ..training import TrainConfig, init_from_env, read_checkpoint, train

    ctx = init_from_env(args.device)
    try:
        config = TrainConfig(**{k: getattr(args, k) for k in _FIELDS}, progress=not args.no_progress)
        ckpt = Path(args.out) / "checkpoint.pt"
        if args.resume and ckpt.is_file():
            # the run's own settings; only the run controls given here may differ
            saved = read_checkpoint(ckpt)["config"]
            keep = {"max_steps", "progress", "out", "device", "checkpoint_every", "data_dir"}
            config = TrainConfig.from_dict({**saved, **{k: getattr(config, k) for k in keep}})
            if ctx.is_main:
                print(f"resuming from {ckpt}")
        result = train(config, resume=bool(args.resume))
        if ctx.is_main:
            final = result.final
            summary = {"out": str(result.out), "steps": result.steps, "final": final}
            print(json.dumps(summary, indent=1))
        return 0
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()
