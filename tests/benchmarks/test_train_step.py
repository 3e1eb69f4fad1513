"""The train-step benchmark's options: --kinds picks the rows it times, and a bad value is a clear error."""

import pytest
import torch

from arbfn.compare import byte_path_config
from arbfn.config import preset
from arbfn.model import init_model
from arbfn.train import train_step as train_step_fn
from benchmarks import train_step


def test_kinds_selects_the_rows(capsys):
    train_step.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--context", "8", "--skip-full",
                     "--kinds", "eager", "--reps", "1"])
    table = capsys.readouterr().out
    assert "ternary byte path, eager" in table and "float twin byte path, bf16 autocast + AdamW, eager" in table
    assert "compiled" not in table and "CUDA graph" not in table


@pytest.mark.parametrize("kinds", ["", "graph", "eager,jit"])
def test_bad_kinds_is_an_error(kinds):
    with pytest.raises(SystemExit, match="--kinds takes"):
        train_step.main(["--device", "cpu", "--preset", "tiny", "--skip-full", "--kinds", kinds])



@pytest.mark.parametrize("layout", list(train_step.LAYOUTS))
def test_every_layout_is_a_config_whose_state_trains(layout):
    """Each extra layout (timed compiled only, so not run here) is a valid update config whose fresh byte-path
    state takes an eager step."""
    cfg = byte_path_config(train_step.with_layout(preset("tiny"), layout))
    state = init_model(cfg, torch.Generator().manual_seed(0))
    state, metrics = train_step_fn(state, torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1)), cfg)
    assert int(state.step) == 1 and int(metrics["flips"]) >= 0
