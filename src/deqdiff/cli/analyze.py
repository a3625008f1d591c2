"""``deqdiff analyze <tool>``: the analyses of Nguyen 2022 (chapters 3–4) on small digits models.

Tools: ``residuals`` (eq. 4.2 curves, Fig. 4.1), ``trajectories`` (PCA of solver iterates,
Figs. 4.2/4.3), ``ntk`` (empirical NTK over training, λ₀ = σ_min(Z), the linear-rate check of
Theorems 3.3.1/3.3.5), ``hessian`` (top eigenvalues of the loss Hessian and its Gauss–Newton
and dynamics parts), ``landscape`` (filter-normalized 1D/2D loss landscapes of a DEQ and
repeat-k, §4.2.1). Each writes PNG figures and a JSON file to ``--out``; the models are trained
with ``deqdiff.training`` and cached in ``--out/models`` (shared by the tools). Every snapshot is
an epoch of one run of ``deqdiff train``'s length (15 epochs, cosine schedule over all of them), so
"trained" means trained to that run's end and "epoch 2" is epoch 2 of that run. ``--quick``
swaps every default for tiny settings (a few images, a coarse grid, one epoch): a smoke run whose
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import (DefaultsHelp, UsageError, check_solver, finite_float, float_list, int_list, nonneg_float, nonneg_int,
                      out_dir, positive_float, positive_int, seed, str_list, user_errors)

TOOLS = ("residuals", "trajectories", "ntk", "hessian", "landscape")

#: the defaults ``--quick`` replaces (only those the command line did not set), per tool
QUICK = {
    "_all": {"train_limit": 64, "batch_size": 32},
    "residuals": {"epochs": [1], "samples": 8, "max_iter": 10},
    "trajectories": {"epochs": [0, 1], "samples": 20, "max_iter": 8},
    "ntk": {"epochs": [0, 1], "samples": 8, "width": 16, "rate_samples": 6, "rate_width": 12, "rate_steps": 5},
    "hessian": {"epochs": [0, 1], "samples": 8, "k": 2, "num_iters": 3},
    "landscape": {"epochs": [1], "samples": 8, "steps": 5},
}

_ints = int_list(nonneg_int)  # training epochs (0 = the initialization)
_floats = float_list(positive_float)
_strs = str_list


def _odd(text: str) -> int:
    v = positive_int(text)
    if v % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd integer ≥ 1 (the grid is centred on the model), got {text!r}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="residual curves, trajectories, NTK, Hessian spectra, loss landscapes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tools = p.add_subparsers(dest="tool", required=True)

    def common(q: argparse.ArgumentParser, epochs: str | None):
        g = q.add_argument_group("run")
        g.add_argument("--out", default="analysis_out", help="output folder (figures, JSON, cached models)")
        g.add_argument("--data", default="digits", choices=("digits", "mnist", "cifar10"))
        g.add_argument("--data-dir", default=None)
        g.add_argument("--train-limit", type=positive_int, default=None, help="train on the first N images only")
        g.add_argument("--epochs", type=_ints, default=_ints(epochs) if epochs else None,
                       help="training checkpoints (epochs, comma-separated; 0 = init), all taken from one run "
                       "of max(15, last epoch) epochs" + ("" if epochs else "; default: the epochs of "
                                                          "'deqdiff train' (15), i.e. trained to convergence"))
        g.add_argument("--batch-size", type=positive_int, default=64)
        g.add_argument("--lr", type=positive_float, default=1e-3)
        g.add_argument("--seed", type=seed, default=0)
        g.add_argument("--threads", type=nonneg_int, default=1,
                       help="torch CPU threads (0: torch's default); the thread count can change the last digits")
        g.add_argument("--quick", action="store_true",
                       help="smoke run: tiny defaults (" + ", ".join(
                           f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in {**QUICK["_all"], **QUICK[q.prog.split()[-1]]}.items()) +
                       "); only options left at their defaults change")
        g.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=_run, _parser=q)

    fmt = DefaultsHelp
    q = tools.add_parser("residuals", help="relative residual curves (eq. 4.2, Fig. 4.1)", formatter_class=fmt)
    q.add_argument("--model", default="conv", help="conv | mon | mon-conv")
    q.add_argument("--samples", type=positive_int, default=64)
    q.add_argument("--solvers", type=_strs, default=_strs("anderson,fixed_point"))
    q.add_argument("--stds", type=_floats, default=_floats("1.0,0.1,0.01"),
                   help="standard deviations σ of the re-drawn cell weights, drawn from N(0, σ²): Nguyen 2022's N(0, 1), "
                   "N(0, 0.01) (read as variance 0.01) and N(0, 1e-4)")
    q.add_argument("--max-iter", type=positive_int, default=40)
    q.add_argument("--tol", type=nonneg_float, default=0.0, help="0: run every input for max-iter iterations")
    common(q, "15")

    q = tools.add_parser("trajectories", help="PCA of solver trajectories over training (Figs. 4.2/4.3)", formatter_class=fmt)
    q.add_argument("--model", default="conv")
    q.add_argument("--samples", type=positive_int, default=150)
    q.add_argument("--max-iter", type=positive_int, default=30)
    q.add_argument("--solver", default="anderson")
    common(q, "0,1,2,15")

    q = tools.add_parser("ntk", help="empirical NTK over training and the linear-rate check (ch. 3)", formatter_class=fmt)
    q.add_argument("--model", default="mon", help="model whose NTK is tracked (mon, conv, …)")
    q.add_argument("--samples", type=positive_int, default=60)
    q.add_argument("--width", type=positive_int, default=64, help="width of the monotone model")
    q.add_argument("--tol", type=positive_float, default=1e-6, help="solve tolerance for the Jacobians")
    q.add_argument("--rate-samples", type=positive_int, default=20, help="N of the linear-rate check (classes 0 vs 1)")
    q.add_argument("--rate-width", type=positive_int, default=256, help="width n of the wide monotone DEQ (n >= N)")
    q.add_argument("--rate-steps", type=positive_int, default=200)
    q.add_argument("--rate-m", type=positive_float, default=1.0, help="monotonicity margin m")
    q.add_argument("--rate-lr", type=positive_float, default=None, help="GD step η (default 1/λ_max(Θ(0)))")
    common(q, "0,1,2,15")

    q = tools.add_parser("hessian", help="top Hessian eigenvalues (total, Gauss–Newton, dynamics) over training", formatter_class=fmt)
    q.add_argument("--model", default="conv")
    q.add_argument("--samples", type=positive_int, default=64)
    q.add_argument("--k", type=positive_int, default=3)
    q.add_argument("--num-iters", type=positive_int, default=12, help="Lanczos steps per term")
    common(q, "0,1,2,15")

    q = tools.add_parser("landscape", help="filter-normalized loss landscapes of a DEQ and repeat-k (§4.2.1), or of "
                         "one model such as the MDEQ (§4.2.2)", formatter_class=fmt)
    q.add_argument("--models", type=_strs, default=_strs("conv,repeat-6,repeat-11,repeat-18"))
    q.add_argument("--model", default=None, help="one model instead of --models, in the setting of Nguyen 2022's "
                   "§4.2.2 MDEQ landscape: held-out images (--split test, --samples 1024) of a model trained "
                   "for the epochs of 'deqdiff train' (e.g. --model mdeq)")
    q.add_argument("--split", choices=("train", "test"), default=None,
                   help="images the loss is averaged over (default: train; test with --model)")
    q.add_argument("--steps", type=_odd, default=51, help="grid points per axis (odd)")
    q.add_argument("--span", type=finite_float, nargs=2, default=(-1.0, 1.0))
    q.add_argument("--samples", type=positive_int, default=None, help="images the loss is averaged over (default: 32; "
                   "1024 with --model, at most the split's size: digits hold out 360)")
    q.add_argument("--points-per-batch", type=positive_int, default=128, help="grid points evaluated in one vmapped pass")
    q.add_argument("--ignore", default="biasbn", choices=("biasbn", "copy"), help="1-D parameters: zero or copy")
    q.add_argument("--no-1d", action="store_true")
    common(q, None)


def _bar(args):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return lambda it, **kw: tqdm(it, leave=False, **kw)


def _snapshots(args, model: str, epochs=None):
    from ..analysis.runs import trained_snapshots
    from ..training import TrainConfig

    settings = dict(data=args.data, data_dir=args.data_dir, train_limit=args.train_limit, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed)
    if model.startswith("mon"):
        settings["width"] = getattr(args, "width", 64)
    epochs = epochs or args.epochs
    horizon = max(TrainConfig().epochs, *epochs)  # every snapshot is an epoch of one standard-length run
    return trained_snapshots(model, epochs, Path(args.out) / "models", horizon=horizon,
                             progress=not args.no_progress, **settings)


def _write(out: Path, name: str, data: dict, args: argparse.Namespace | None = None) -> Path:
    """``data`` as ``<out>/<name>.json``, with the command's settings under "settings"."""
    if args is not None:
        import torch

        data = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("func", "_parser")},
                             "torch_threads": torch.get_num_threads()}, **data}
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def _check(args: argparse.Namespace) -> Path:
    """Every input that can be wrong, before any training: models, solvers, span, data, --out."""
    from ..data import load_dataset
    from ..training import model_kind

    for flag, names in (("--model", [getattr(args, "model", None)]), ("--models", getattr(args, "models", []))):
        for name in names:
            if name is not None:
                with user_errors(flag):
                    model_kind(name)
    mon = str(getattr(args, "model", "")).startswith("mon")
    splitting = ("pr", "fb", "forward_backward", "peaceman_rachford") if mon else ()
    for flag in ("--solver", "--solvers"):
        names = getattr(args, flag[2:], None)
        for name in [names] if isinstance(names, str) else names or []:
            check_solver(name, flag, extra=splitting)
    if hasattr(args, "span") and not args.span[0] < args.span[1]:
        raise UsageError(f"--span {args.span[0]:g} {args.span[1]:g}: the first end must be below the second")
    with user_errors(f"--data {args.data}", kinds=(ValueError, TypeError, OSError, ImportError)):
        load_dataset(args.data, args.data_dir, seed=args.seed)  # missing or corrupt files
    return out_dir(args.out)


def _apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: every default of QUICK that the command line left alone takes its tiny value."""
    parser = args._parser
    for name, value in {**QUICK["_all"], **QUICK[args.tool]}.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.quick:
        _apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _check(args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tool = {"residuals": _residuals, "trajectories": _trajectories, "ntk": _ntk, "hessian": _hessian,
            "landscape": _landscape}[args.tool]
    with user_errors(kinds=(OSError,)):  # e.g. the disk filled up while writing figures
        files = tool(args, out)
    print(f"[analyze] {args.tool} finished in {time.perf_counter() - t0:.1f} s; wrote " + ", ".join(map(str, files)))
    return 0


# --- tools ----------------------------------------------------------------------------------

def _residuals(args, out: Path) -> list:
    import copy

    from ..analysis import plotting
    from ..analysis.residuals import reinit_normal_, residual_curves
    from ..analysis.runs import digits_split

    X, _ = digits_split(args.data, limit=args.samples, seed=args.seed, data_dir=args.data_dir)
    snaps = _snapshots(args, args.model, [0, max(args.epochs)])
    curves = {}
    for std in args.stds:
        model = reinit_normal_(copy.deepcopy(snaps[0]), std, seed=args.seed)
        for solver in args.solvers:
            key = f"init N(0, σ²), σ = {std:g} (variance {std**2:g}) / {solver}"
            curves[key] = residual_curves(model, X, solver=solver, tol=args.tol, max_iter=args.max_iter, label=key)
    trained = snaps[max(args.epochs)]
    for solver in args.solvers:
        key = f"trained (epoch {max(args.epochs)}) / {solver}"
        curves[key] = residual_curves(trained, X, solver=solver, tol=args.tol, max_iter=args.max_iter, label=key)
    fig = plotting.plot_residual_curves(curves, out / "residuals.png", ncols=len(args.solvers))
    js = _write(out, "residuals", {"model": args.model, "samples": args.samples, "max_iter": args.max_iter,
                                   "curves": {k: c.to_dict(max_curves=16) for k, c in curves.items()}}, args)
    for k, c in curves.items():
        final = c.held[-1]
        print(f"  {k:50s} final residual: median {float(final.median()):.2e}, "
              f"below 1e-3 for {float((final <= 1e-3).double().mean()):.0%} of inputs")
    return [fig, js]


def _trajectories(args, out: Path) -> list:
    from ..analysis import plotting
    from ..analysis.runs import digits_split
    from ..analysis.trajectories import trajectories_over_training

    X, Y = digits_split(args.data, split="train", limit=args.samples, seed=args.seed, data_dir=args.data_dir)
    snaps = _snapshots(args, args.model)
    res = trajectories_over_training({f"epoch {e}": m for e, m in snaps.items()}, X, solver=args.solver,
                                     max_iter=args.max_iter)
    fig = plotting.plot_trajectories(res, Y.tolist(), out / "trajectories.png", ncols=len(res))
    js = _write(out, "trajectories", {
        "model": args.model, "samples": args.samples, "labels": Y.tolist(),
        "checkpoints": {k: {"explained": r["explained"].tolist(), "mean_step": r["mean_step"].tolist(),
                            "coords": r["coords"][:, :32].tolist()} for k, r in res.items()}}, args)
    return [fig, js]


def _ntk(args, out: Path) -> list:
    from ..analysis import plotting
    from ..analysis.ntk import (empirical_ntk, equilibrium_matrix, lambda_0, ntk_summary,
                                per_sample_jacobian)
    from ..analysis.runs import digits_split

    X, _ = digits_split(args.data, split="train", limit=args.samples, seed=args.seed, data_dir=args.data_dir)
    snaps = _snapshots(args, args.model)
    overrides = dict(tol=args.tol, max_iter=300)
    if args.model.startswith("mon"):
        overrides["solver"] = "anderson"  # an engine solver: the splitting solvers hold batch structure
    track, spectra = [], {}
    bar = _bar(args)
    for e, model in snaps.items():
        t = time.perf_counter()
        J = per_sample_jacobian(model, X, progress=bar, **overrides)
        K = empirical_ntk(model, X, jacobians=(J, J))
        s = ntk_summary(K)
        Z = equilibrium_matrix(model, X, **overrides)
        rec = {"epoch": e, "sigma_min_Z": lambda_0(Z), "width": int(Z.shape[0]), "seconds": time.perf_counter() - t,
               **{k: s[k] for k in ("size", "lambda_min", "lambda_max", "condition", "trace", "symmetry_error")},
               "top_eigenvalues": s["top_eigenvalues"][:10]}
        track.append(rec)
        spectra[f"epoch {e}"] = s["spectrum"]
        print(f"  epoch {e}: NTK {s['size']}x{s['size']}, λ_min {s['lambda_min']:.3e}, λ_max {s['lambda_max']:.3e}, "
              f"σ_min(Z) {rec['sigma_min_Z']:.3e} (width {rec['width']}, N {X.shape[0]})")
    fig1 = plotting.plot_ntk(spectra, track, out / "ntk.png")
    rate = _rate_check(args)
    fig2 = plotting.plot_linear_rate(rate, out / "ntk_linear_rate.png")
    js = _write(out, "ntk", {"model": args.model, "samples": args.samples, "track": track, "linear_rate": rate}, args)
    print(f"  linear-rate check: λ₀ {rate['lambda_0']:.3e}, η {rate['lr']:.3e}, loss {rate['loss'][0]:.3e} → "
          f"{rate['loss'][-1]:.3e}; bound (1-ηλ₀²/4)^k holds: {rate['bound_holds']}; "
          f"theorem conditions hold: {rate['theorem']['all_hold']}")
    return [fig1, fig2, js]


def _rate_check(args) -> dict:
    """A wide scalar-output monotone DEQ (width n ≥ N) on N digits (0 → −1, 1 → +1, unit-norm
    inputs) trained by full-batch GD on ½‖ŷ − y‖² (Nguyen 2022 §3.2) in float64."""
    import torch

    from ..analysis.ntk import empirical_ntk, linear_rate_check
    from ..data import load_dataset
    from ..models.monotone import MonotoneDEQ

    ds = load_dataset(args.data, args.data_dir, seed=args.seed)
    y_all = ds.labels("train", slice(None))
    idx = torch.nonzero(y_all <= 1).flatten()[: args.rate_samples]
    X = ds.images("train", idx, dtype=torch.float64).flatten(1)
    X = X / X.norm(dim=1, keepdim=True)
    y = torch.where(y_all[idx] == 1, 1.0, -1.0).double()
    torch.manual_seed(args.seed)
    model = MonotoneDEQ(X.shape[1], args.rate_width, 1, m=args.rate_m, solver="anderson", tol=1e-10,
                        max_iter=500).double()
    lr = args.rate_lr
    if lr is None:
        K0 = empirical_ntk(model, X)
        lr = float(1.0 / torch.linalg.eigvalsh(K0)[-1])

    def parts(m):
        c = m.cell
        return {"A": c.A.weight, "B": c.B.weight, "U": c.U.weight, "u": m.head.weight.reshape(-1)}

    return linear_rate_check(model, X, y, lr=lr, steps=args.rate_steps, parts=parts, m=args.rate_m,
                             progress=_bar(args))


def _hessian(args, out: Path) -> list:
    import torch.nn.functional as F

    from ..analysis import plotting
    from ..analysis.hessian import hessian_spectrum
    from ..analysis.runs import digits_split

    X, Y = digits_split(args.data, split="train", limit=args.samples, seed=args.seed, data_dir=args.data_dir)
    snaps = _snapshots(args, args.model)
    track = []
    items = list(snaps.items())
    bar = _bar(args)
    for e, model in (bar(items, desc="checkpoints") if bar else items):
        t = time.perf_counter()
        # the Hessian's solves use the model's own derivative solver (the MDEQ's is Anderson: at its
        # initialization plain Richardson iteration with ∂f/∂z diverges)
        solver = model.deq.solver_options.get("backward_solver", "auto") if hasattr(model, "deq") else "auto"
        solver = solver if isinstance(solver, str) else "auto"
        r = hessian_spectrum(model.float(), F.cross_entropy, X, Y, k=args.k, num_iters=args.num_iters, seed=args.seed,
                             solver=solver)
        r.update(epoch=e, seconds=time.perf_counter() - t)
        track.append(r)
        print(f"  epoch {e}: loss {r['loss']:.4f}, top eigenvalues total {['%.3g' % v for v in r['total']]}, "
              f"GN {['%.3g' % v for v in r['gauss_newton']]}, dynamics {['%.3g' % v for v in r['dynamics']]}")
    fig = plotting.plot_hessian(track, out / "hessian.png")
    js = _write(out, "hessian", {"model": args.model, "samples": args.samples, "k": args.k,
                                 "num_iters": args.num_iters, "track": track}, args)
    return [fig, js]


def _landscape(args, out: Path) -> list:
    import torch
    import torch.nn.functional as F

    from ..analysis import plotting
    from ..analysis.landscape import flatness_summary, landscape_1d, landscape_2d
    from ..analysis.runs import digits_split

    single = args.model is not None
    split = args.split or ("test" if single else "train")
    samples = args.samples or (1024 if single else 32)
    X, Y = digits_split(args.data, split=split, limit=samples, seed=args.seed, data_dir=args.data_dir)
    if X.shape[0] < samples:
        print(f"  {args.data} {split} split has {X.shape[0]} images: the landscape averages over all of them "
              f"(asked for {samples})")
    models = [args.model] if single else args.models
    if args.epochs is None:  # Nguyen 2022 compares minimizers trained to convergence: 'deqdiff train''s epochs
        from ..training import TrainConfig

        args.epochs = [TrainConfig().epochs]
    e = max(args.epochs)
    lands2, lands1, summary = {}, {}, {}
    Xt, Yt = digits_split(args.data, split="test", seed=args.seed, data_dir=args.data_dir)
    for name in models:
        model = _snapshots(args, name, [e])[e]
        with torch.no_grad():  # how far training got: the held-out accuracy of the minimizer
            acc = float(sum((model(Xt[i:i + 256]).argmax(1) == Yt[i:i + 256]).sum() for i in range(0, len(Yt), 256)))
        acc /= len(Yt)
        bar = _bar(args)
        prog = (lambda it, name=name: bar(it, desc=f"{name} 2D")) if bar else None
        kw = dict(seed=args.seed, steps=args.steps, span=tuple(args.span), ignore=args.ignore,
                  points_per_batch=args.points_per_batch)
        lands2[name] = landscape_2d(model, F.cross_entropy, X, Y, progress=prog, **kw)
        if not args.no_1d:
            lands1[name] = landscape_1d(model, F.cross_entropy, X, Y, **kw)
        f = flatness_summary(lands2[name])
        summary[name] = {"epochs": e, "test_accuracy": acc, "flatness": f,
                         "seconds_2d": lands2[name].meta["seconds"],
                         "convergence_warnings": lands2[name].meta["convergence_warnings"]}
        print(f"  {name:10s} test accuracy {acc:.2%} (epoch {e}); L* {f['center_loss']:.4f}; "
              f"area(Φ ≤ L*+0.1) {f['area_below']['0.1']:.3f}, "
              f"(≤ L*+1) {f['area_below']['1.0']:.3f}; sharpness r=0.5 {f['sharpness']['0.5']:.3f}; "
              f"curvature {['%.3g' % c for c in f['curvature']]}; {lands2[name].meta['seconds']:.0f} s")
    files = [plotting.plot_landscapes_2d(lands2, out / "landscape_contour.png"),
             plotting.plot_landscape_surfaces(lands2, out / "landscape_surface.png")]
    if lands1:
        files.append(plotting.plot_landscapes_1d(lands1, out / "landscape_1d.png"))
    files.append(_write(out, "landscape", {
        "models": models, "epochs": e, "split": split, "samples": int(X.shape[0]), "grid": args.steps,
        "span": list(args.span),
        "ignore": args.ignore, "summary": summary,
        "landscapes_2d": {k: l.to_dict() for k, l in lands2.items()},
        "landscapes_1d": {k: l.to_dict() for k, l in lands1.items()}}, args))
    return files
