"""Training throughput of the conv DEQ (thesis eq. 4.1) at CIFAR-10 shape on generated data.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_train.py --device cuda            # full run (GPU)
    PYTHONPATH=src python benchmarks/bench_train.py --quick                  # CPU smoke run (< 1 min)

What is measured: complete optimizer steps of ``deqdiff train`` — the forward equilibrium solve
(Anderson, relative tolerance ``--tol``), the implicit backward solve (GMRES with I − ∂f/∂z at
z*), Adam and the cosine schedule — on random 3×32×32 images with random labels out of 10,
for each precision: ``float32`` and ``bf16`` (``torch.autocast`` of the forward pass, the
solvers' state and the loss stay float32). The ``repeat-k`` explicit network with the same cell
is measured alongside (``--repeat``). After ``--warmup`` steps, ``--steps`` steps are timed
(wall clock, CUDA synchronized); reported: images/s, ms/step, mean and max forward-solve
iterations per sample, mean backward-solve iterations, peak CUDA memory.

JSON goes to ``benchmarks/results/train_<device>[_quick].json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import harness
from deqdiff.training import Meter, TrainConfig, build_model
from deqdiff.training.trainer import make_optimizer, make_scheduler


def measure(config: TrainConfig, batch: int, steps: int, warmup: int) -> dict:
    device = config.device
    torch.manual_seed(0)
    model = build_model(config, (3, 32, 32), 10)
    opt = make_optimizer(config, model)
    sched = make_scheduler(config, opt, warmup + steps)
    g = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(warmup + steps, batch, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(0, 10, (warmup + steps, batch), generator=g).to(device)
    cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if config.amp == "bf16" else nullcontext()
    meter = Meter()
    cuda = device.startswith("cuda")
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with cast:
            logits = model(images[i])
        loss = F.cross_entropy(logits.float(), labels[i])
        loss.backward()
        opt.step()
        sched.step()
        if i >= warmup:
            meter.add_solves(model, backward=True)
            meter.add_batch(float(loss.detach()) * batch, 0, batch)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    s = meter.summary()
    out = {
        "model": config.model, "precision": config.amp or config.dtype, "batch": batch, "steps": steps,
        "images_per_s": batch * steps / elapsed, "ms_per_step": 1e3 * elapsed / steps,
        "loss_mean": s["loss"],
    }
    for key in ("fwd_iter_mean", "fwd_iter_max", "fwd_res_max", "fwd_converged", "bwd_iter_mean", "bwd_iter_max"):
        if key in s:
            out[key] = s[key]
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="default 100 (thesis), quick 8")
    p.add_argument("--channels", type=int, default=None, help="default 48, quick 8")
    p.add_argument("--hidden", type=int, default=None, help="default 64, quick 8")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--repeat", type=int, default=6, help="also measure repeat-K (0: skip)")
    p.add_argument("--precisions", default="float32,bf16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    q = args.quick
    batch = args.batch or (8 if q else 100)
    channels, hidden = args.channels or (8 if q else 48), args.hidden or (8 if q else 64)
    steps, warmup = args.steps or (2 if q else 20), args.warmup if args.warmup is not None else (1 if q else 3)
    models = ["conv"] + ([f"repeat-{args.repeat}"] if args.repeat else [])
    rows = []
    for model in models:
        for prec in args.precisions.split(","):
            cfg = TrainConfig(model=model, channels=channels, hidden=hidden, groups=4 if q else 8, pool=4,
                              tol=args.tol, max_iter=args.max_iter, device=args.device,
                              amp="bf16" if prec == "bf16" else None, progress=False)
            row = measure(cfg, batch, steps, warmup)
            rows.append(row)
            print(json.dumps(row))
    machine = harness.machine_info("torch", "threads", "processor")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine["processor"]
    result = {
        "benchmark": "bench_train", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": machine["torch"], "device": args.device, "device_name": device_name,
        "threads": machine["threads"], "quick": q,
        "settings": {"batch": batch, "channels": channels, "hidden": hidden, "image": [3, 32, 32],
                     "tol": args.tol, "max_iter": args.max_iter, "solver": "anderson", "backward": "auto (gmres)",
                     "optimizer": "adam 1e-3, cosine"},
        "rows": rows,
    }
    dev = args.device.replace(":", "")
    out = harness.write_json(args.out or f"benchmarks/results/train_{dev}{'_quick' if q else ''}.json", result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
