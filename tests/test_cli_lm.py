"""``deqdiff lm`` end to end on a tiny text: files written, bit-exact ``--resume``, the
``--compare`` job, and one-line errors naming the flag or file for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from deqdiff.cli import main

TINY = ["--d-model", "8", "--n-heads", "2", "--d-ff", "8", "--seq-len", "8", "--train-windows", "16",
        "--valid-windows", "4", "--batch-size", "8", "--epochs", "2", "--tol", "1e-4", "--no-progress"]


@pytest.fixture
def text(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("the fixed point of a map is a point it leaves fixed. " * 12, encoding="utf-8")
    return str(f)


def test_lm_writes_results_and_resumes_bit_exactly(tmp_path, text, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["lm", "--text", text, *TINY, "--out", str(whole)]) == 0
    for name in ("results.json", "loss_curves.png", "checkpoint.pt", "metrics.json"):
        assert (whole / name).is_file()
    res = json.loads((whole / "results.json").read_text())["model"]
    assert res["steps"] == 4 and res["test_bpc"] > 0 and res["fwd_iter_mean"] >= 1 and res["bwd_iter_mean"] >= 0
    assert res["time_per_epoch_s"] > 0 and len(res["valid_bpc"]) == 2
    assert main(["lm", "--text", text, *TINY, "--out", str(part), "--max-steps", "3"]) == 0
    assert main(["lm", "--resume", "--out", str(part), "--no-progress"]) == 0
    again = json.loads((part / "results.json").read_text())["model"]
    assert again["test_bpc"] == res["test_bpc"] and again["step_bpc"] == res["step_bpc"]


@pytest.mark.slow
def test_lm_compare_trains_both_in_their_own_processes(tmp_path, text):
    out = tmp_path / "cmp"
    assert main(["lm", "--compare", "--unrolled-depth", "2", "--text", text, *TINY, "--epochs", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["unrolled"]["model"] == "unrolled-2" and res["comparison"]["depth"] == 2
    assert (out / "deq" / "checkpoint.pt").is_file() and (out / "unrolled-2" / "checkpoint.pt").is_file()
    assert (out / "loss_curves.png").is_file() and "target_met" in res["comparison"]


def _bin(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00")
    return str(tmp_path / "b.txt")


def _other(tmp_path):
    (tmp_path / "o.txt").write_text("a different text with other words in it. " * 12, encoding="utf-8")
    return str(tmp_path / "o.txt")


def _resumable(tmp_path, text):
    main(["lm", "--text", text, *TINY, "--out", str(tmp_path / "r"), "--max-steps", "1"])
    return str(tmp_path / "r")


CASES = {
    "model": (lambda p, t: ["--model", "wide", "--out", str(p / "o")], "--model"),
    "heads": (lambda p, t: ["--n-heads", "3", "--out", str(p / "o")], "--d-model"),
    "seq": (lambda p, t: ["--seq-len", "0"], "--seq-len"),
    "tol": (lambda p, t: ["--tol", "nan"], "--tol"),
    "solver": (lambda p, t: ["--solver", "magic", "--text", t, "--out", str(p / "o")], "--solver"),
    "backward": (lambda p, t: ["--backward-solver", "magic", "--text", t, "--out", str(p / "o")], "--backward-solver"),
    "missing text": (lambda p, t: ["--text", str(p / "none.txt"), "--out", str(p / "o")], "--text"),
    "binary text": (lambda p, t: ["--text", _bin(p), "--out", str(p / "o")], "not UTF-8"),
    "window too long": (lambda p, t: ["--text", t, "--seq-len", "500", "--out", str(p / "o")], "--seq-len"),
    "no checkpoint": (lambda p, t: ["--resume", "--out", str(p / "empty")], "--resume"),
    "changed setting": (lambda p, t: ["--resume", "--lr", "0.5", "--out", _resumable(p, t)], "--lr"),
    "other text": (lambda p, t: ["--resume", "--text", _other(p), "--out", _resumable(p, t)], "--resume"),
    "compare with model": (lambda p, t: ["--compare", "--model", "deq"], "--compare"),
    "depth without compare": (lambda p, t: ["--unrolled-depth", "3", "--out", str(p / "o")], "--unrolled-depth"),
    "out is a file": (lambda p, t: ["--text", t, *TINY, "--out", t], "--out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_flag(tmp_path, text, capsys, case):
    argv, needle = CASES[case]
    with pytest.raises(SystemExit) if case in ("seq", "tol") else _NoExit() as exit_code:
        code = main(["lm", *argv(tmp_path, text)])
    code = exit_code.value.code if case in ("seq", "tol") else code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err and needle in err, err
    assert err.startswith("deqdiff lm: error:")


class _NoExit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_lm_under_torchrun(tmp_path, text):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["torchrun", "--nproc_per_node=2", "--no-python", "deqdiff", "lm", "--text", text, *TINY, "--epochs", "1",
           "--out", str(tmp_path / "ddp")]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["model"]["steps"] == 2
