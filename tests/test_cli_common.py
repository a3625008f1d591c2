"""The helpers the training jobs' command lines share (deqdiff.cli._common): run flags,
optional integers, resumed settings, config errors named by flag, the defaults help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest
import torch

from deqdiff.cli._common import (OneLineParser, UsageError, add_run_flags, config_defaults_help, disk_errors,
                                 distributed_job, flagged, given_settings, nonneg_int, optional, resumed_settings,
                                 set_threads)


def test_optional_reads_none_and_checks_the_rest():
    parse = optional(nonneg_int)
    assert parse("none") is None and parse("NONE") is None and parse("3") == 3
    assert parse.__name__ == "an integer ≥ 0 or 'none'"
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer ≥ 0, got '-1'"):
        parse("-1")
    assert optional(nonneg_int, ("none", "all"), "steps or 'all'")("all") is None


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="job", argument_default=argparse.SUPPRESS)
    add_run_flags(p.add_argument, device=None, dtype="states", seed="seeds it", checkpoint_every="steps",
                  max_steps="at most", threads=None, no_progress=None)
    return p


def test_run_flags_types_defaults_and_help():
    p = _parser()
    args = p.parse_args(["--seed", "5", "--max-steps", "none", "--dtype", "float64"])
    assert (args.seed, args.max_steps, args.dtype, args.threads, args.no_progress) == (5, None, "float64", 1, False)
    assert not hasattr(args, "device") and not hasattr(args, "checkpoint_every")  # "not given"
    assert p.parse_args(["--max-steps", "7", "--no-progress"]).max_steps == 7
    text = " ".join(p.format_help().split())
    assert "--device DEVICE cpu, cuda, cuda:1, …" in text and "--dtype {float32,float64} states" in text
    assert "--threads THREADS torch CPU threads (0: torch's default)" in text and "--no-progress no progress bar" in text
    for bad in (["--seed", "-1"], ["--checkpoint-every", "1.5"], ["--threads", "x"], ["--dtype", "half"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    q = argparse.ArgumentParser()
    add_run_flags(q.add_argument, {"seed": 7, "checkpoint_every": 1}, seed=None, checkpoint_every=None)
    assert (q.parse_args([]).seed, q.parse_args([]).checkpoint_every) == (7, 1)
    with pytest.raises(KeyError):
        add_run_flags(q.add_argument, epochs="not a shared run flag")


def test_given_settings_and_flagged_config_errors():
    args = argparse.Namespace(lr=0.5, seed=1, other=2)
    assert given_settings(args, ("lr", "seed", "max_steps")) == {"lr": 0.5, "seed": 1}
    err = flagged(ValueError("max_steps must be an integer >= 0, got -1"), ("max_steps",))
    assert isinstance(err, UsageError) and str(err) == "--max-steps: max_steps must be an integer >= 0, got -1"
    assert str(flagged(ValueError("d_model must divide\nby heads"), ("lr",))) == "d_model must divide by heads"
    assert str(flagged(ValueError("n_train too small"), {"n_train"}, lambda k: "--N")) == "--N: n_train too small"


def test_resumed_settings(tmp_path):
    def read(path):
        assert path == tmp_path / "checkpoint.pt"
        return {"config": {"lr": 0.1, "seed": 0, "max_steps": 4}}

    with pytest.raises(UsageError, match="--resume: no checkpoint at"):
        resumed_settings(tmp_path, {}, read, ())
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    saved, path = resumed_settings(tmp_path, {"lr": 0.1, "max_steps": 9}, read, {"max_steps"})
    assert saved == {"lr": 0.1, "seed": 0, "max_steps": 4} and path == tmp_path / "checkpoint.pt"
    with pytest.raises(UsageError) as info:
        resumed_settings(tmp_path, {"seed": 3, "lr": 0.2, "max_steps": 9}, read, {"max_steps"}, note=" (see -h)",
                         name=lambda k: "the seed" if k == "seed" else "--" + k)
    assert str(info.value) == (f"--resume: --lr 0.2 (checkpoint: 0.1), the seed 3 (checkpoint: 0) would not continue "
                               f"the run in {tmp_path}; a resumed run keeps its settings (see -h)")

    def unreadable(path):
        raise ValueError("not a deqdiff checkpoint")

    with pytest.raises(UsageError, match="^--resume: not a deqdiff checkpoint$"):
        resumed_settings(tmp_path, {}, unreadable, ())


def test_disk_errors_name_the_output_folder():
    with pytest.raises(UsageError, match=r"^--out runs/x: \[Errno 28\] No space left on device$"):
        with disk_errors("runs/x"):
            raise OSError(28, "No space left on device")
    with pytest.raises(KeyError), disk_errors("runs/x"):  # anything else is a bug: left alone
        raise KeyError("k")


def test_config_defaults_help():
    @dataclass
    class Config:
        lr: float = 0.001
        seed: int = 0
        out: str | None = None

    p = argparse.ArgumentParser(prog="job", formatter_class=config_defaults_help(Config, skip=("seed",)),
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--lr", help="step size")
    p.add_argument("--seed", help="seed")
    p.add_argument("--out", help="folder")
    p.add_argument("--threads", default=1, help="threads")
    text = " ".join(p.format_help().split())
    assert "step size (default: 0.001)" in text and "seed (default" not in text
    assert "folder (default" not in text and "threads (default: 1)" in text


def test_threads_and_single_process_job():
    before = torch.get_num_threads()
    try:
        set_threads(0)
        assert torch.get_num_threads() == before
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with distributed_job("cpu") as ctx:
        assert not ctx.active and ctx.is_main
