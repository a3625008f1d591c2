"""The analyses' model cache: snapshots trained in stages, in one call or over several calls,
equal one uninterrupted run bit for bit, and files of a run with other settings are never reused."""

import functools

import torch

from deqdiff.analysis.runs import trained_snapshots
from deqdiff.training import TrainConfig, train

SETTINGS = dict(channels=4, hidden=4, groups=2, train_limit=16, test_limit=4, batch_size=8, lr=1e-2, tol=1e-4,
                max_iter=20)
QUIET = dict(log=lambda *_: None)


@functools.lru_cache(maxsize=None)
def _straight(epoch: int, horizon: int):
    """The model after ``epoch`` epochs of one uninterrupted run of ``horizon`` epochs."""
    return train(TrainConfig(model="conv", epochs=horizon, max_steps=2 * epoch, progress=False, **SETTINGS)).model


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_continued_in_a_later_call_equals_straight_run(tmp_path):
    """Epoch 1 in one call, then continued to epoch 3 in another (resuming the cached run):
    the epoch-3 snapshot is the straight run's epoch 3, and epoch 1 is the straight run's epoch 1."""
    first = trained_snapshots("conv", [1], tmp_path, horizon=4, **QUIET, **SETTINGS)
    later = trained_snapshots("conv", [1, 3], tmp_path, horizon=4, **QUIET, **SETTINGS)
    assert _equal(later[3], _straight(3, 4))
    assert _equal(first[1], later[1]) and _equal(later[1], _straight(1, 4))
    assert not _equal(later[1], later[3])  # the test can fail: training moved the weights


def test_other_horizon_never_reuses_files(tmp_path):
    """A run with another schedule length (another learning rate at every step) starts over and
    deletes the other run's snapshots instead of mixing them with its own."""
    trained_snapshots("conv", [1, 2], tmp_path, horizon=4, **QUIET, **SETTINGS)
    snaps = trained_snapshots("conv", [2], tmp_path, **QUIET, **SETTINGS)  # horizon 2
    assert _equal(snaps[2], _straight(2, 2)) and not _equal(snaps[2], _straight(2, 4))
    assert not (tmp_path / "conv" / "epoch1.pt").exists()


def test_earlier_epoch_after_later_one_restarts(tmp_path, capsys):
    """Asking for an epoch before the cached run's checkpoint trains it from the start; the
    cached later snapshot is loaded, not retrained."""
    trained_snapshots("conv", [2], tmp_path, horizon=3, **SETTINGS)
    capsys.readouterr()
    snaps = trained_snapshots("conv", [1, 2], tmp_path, horizon=3, **SETTINGS)
    printed = capsys.readouterr().out
    assert "loaded cached snapshots [2]" in printed and "training to epoch 1 of 3" in printed
    assert _equal(snaps[1], _straight(1, 3))


def test_bad_horizon_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="horizon"):
        trained_snapshots("conv", [3], tmp_path, horizon=2, **QUIET, **SETTINGS)
