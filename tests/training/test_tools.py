"""Training tools in ``train``/``deqdiff train``: phantom gradients, fixed-point correction, cell
normalization, bf16 — runs resume bit-exactly, and the CLI flags reach the model."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff import PhantomGrad
from deqdiff.cli import main
from deqdiff.layers.normalization import WeightNorm
from deqdiff.training import load_checkpoint, train
from tests.training.helpers import tiny_config, tiny_data


@pytest.mark.parametrize("tools", [
    dict(grad="phantom", phantom_steps=3, phantom_damping=0.7, correction=[2, 4], cell_norm="spectral"),
    pytest.param(dict(amp="bf16", cell_norm="weight", correction=[3]), marks=pytest.mark.slow),
])
def test_resume_with_tools_is_bit_exact(tmp_path, tools):
    data = tiny_data()
    straight = train(tiny_config(max_steps=4, epochs=1, out=str(tmp_path / "a"), **tools), data)
    train(tiny_config(max_steps=2, epochs=1, out=str(tmp_path / "b"), **tools), data)
    resumed = train(tiny_config(max_steps=4, epochs=1, out=str(tmp_path / "b"), **tools), data, resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in straight.history["steps"])
    if tools["cell_norm"] == "spectral":  # the power-iteration vectors are part of the state
        assert any(k.endswith("._u") for k in straight.model.state_dict())


def test_cli_flags_reach_the_model(tmp_path, capsys):
    out = str(tmp_path / "run")
    tiny = ["--data", "digits", "--train-limit", "16", "--test-limit", "8", "--batch-size", "8", "--channels", "4",
            "--hidden", "4", "--groups", "2", "--no-progress", "--epochs", "1"]
    assert main(["train", "--grad", "phantom", "--phantom-steps", "2", "--phantom-damping", "0.9", "--correction", "2,5",
                 "--correction-weights", "0.5,1", "--cell-norm", "weight", "--out", out, *tiny]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    loaded = load_checkpoint(tmp_path / "run")
    cfg = loaded.config
    assert (cfg.grad, cfg.phantom_steps, cfg.phantom_damping, cfg.correction, cfg.correction_weights) == (
        "phantom", 2, 0.9, [2, 5], [0.5, 1.0])
    assert loaded.model.deq.solver_options["grad"] == PhantomGrad(2, 0.9)
    assert isinstance(loaded.model.deq.cell.conv1.parametrizations.weight[0], WeightNorm)
    with pytest.raises(SystemExit):
        main(["train", "--phantom-damping", "1.5", "--out", out, *tiny])
    assert "--phantom-damping: expected a number in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--correction", "3,1", "--out", str(tmp_path / "x"), *tiny]) == 2
    assert "strictly increasing" in capsys.readouterr().err
