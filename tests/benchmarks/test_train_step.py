"""The train-step benchmark's options: --kinds picks the rows it times, and a bad value is a clear error."""

import pytest

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
