"""Language-model training: bit-exact resume at every kind of boundary, 2-process = 1-process
(gloo), non-convergence counted with its residual, settings validated."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqdiff.data.text import CharCorpus
from deqdiff.training.lm import LMConfig, train_lm


def tiny_corpus() -> CharCorpus:
    g = torch.Generator().manual_seed(0)
    words = ["deq ", "fixed ", "point ", "solve ", "tensor ", "grad "]
    text = "".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=g))
    return CharCorpus.from_text(text, name="tiny")


def tiny(**kw) -> LMConfig:
    base = dict(d_model=8, n_heads=2, d_ff=8, seq_len=8, train_windows=24, valid_windows=4, epochs=2, batch_size=8,
                eval_batch_size=8, lr=1e-2, dtype="float64", tol=1e-8, max_iter=60, progress=False)
    return LMConfig(**{**base, **kw})


def _same(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [s["loss"] for s in a.history["steps"]] == [s["loss"] for s in b.history["steps"]]
    assert a.test == b.test


@pytest.mark.parametrize("stop", [2, 3])  # mid-epoch, at the epoch boundary (3 steps per epoch)
def test_resume_is_bit_exact(tmp_path, stop):
    corpus = tiny_corpus()
    whole = train_lm(tiny(out=str(tmp_path / "whole")), corpus)
    part = train_lm(tiny(out=str(tmp_path / "part"), max_steps=stop), corpus)
    assert part.steps == stop and part.test is None
    resumed = train_lm(tiny(out=str(tmp_path / "part")), corpus, resume=True)
    assert resumed.steps == whole.steps == 6
    _same(whole, resumed)
    assert "fwd_iter_mean" in whole.final["train"] and "bwd_iter_mean" in whole.final["train"]
    assert whole.test["bpc"] > 0


def test_resume_refuses_changed_settings(tmp_path):
    corpus = tiny_corpus()
    train_lm(tiny(out=str(tmp_path), max_steps=1), corpus)
    with pytest.raises(ValueError, match="lr"):
        train_lm(tiny(out=str(tmp_path), lr=0.5), corpus, resume=True)
    other = CharCorpus.from_text(corpus.decode(torch.cat([corpus.train, corpus.valid, corpus.test]))[::-1], name="r")
    with pytest.raises(ValueError, match="text differs"):
        train_lm(tiny(out=str(tmp_path)), other, resume=True)


def test_unrolled_model_trains_and_reports_no_solves():
    r = train_lm(tiny(model="unrolled-3", epochs=1), tiny_corpus())
    assert r.model.depth == 3 and "fwd_iter_mean" not in r.final["train"]
    assert r.history["memory"]["method"]


def test_non_convergence_is_counted_with_its_residual():
    r = train_lm(tiny(epochs=1, max_iter=1, tol=1e-12), tiny_corpus())
    tr = r.final["train"]
    assert tr["fwd_unconverged"] == 24 and tr["fwd_res_max"] > 1e-12


@pytest.mark.parametrize("bad, match", [(dict(model="unrolled-0"), "model"), (dict(n_heads=3), "divisible"),
                                        (dict(tol=float("nan")), "tol"), (dict(seq_len=0), "seq_len"),
                                        (dict(dtype="float16"), "dtype"),
                                        (dict(recompute_linearization="yes"), "recompute_linearization")])
def test_bad_settings_name_themselves(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def _worker(rank: int, world: int, init_file: str, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = train_lm(LMConfig.from_dict(config), tiny_corpus())
    if rank == 0:
        torch.save({"state": result.model.state_dict(), "steps": result.history["steps"], "test": result.test}, out)
    dist.barrier()
    # leave without gloo's C++ teardown (it can abort a rank after the work is done)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_process_training_equals_single_process(tmp_path):
    config = tiny(batch_size=7, epochs=1)  # shards of 4 and 3 windows; last batch 3 (2 + 1)
    single = train_lm(config, tiny_corpus())
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), config.to_dict(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], p, rtol=1e-9, atol=1e-11)
    for a, b in zip(single.history["steps"], ddp["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
    assert len(ddp["steps"]) == 4
    assert ddp["test"]["bpc"] == pytest.approx(single.test["bpc"], rel=1e-10)
