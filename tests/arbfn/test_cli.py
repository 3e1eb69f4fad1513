"""Tests of arbfn.cli: `arbfn train | generate | audit` in-process, and once through the installed script."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arbfn import checkpoint
from arbfn.audit import audit
from arbfn.cli import main
from arbfn.config import preset
from arbfn.model import init_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`arbfn train --preset tiny --steps 3 --out DIR --quiet`: (DIR, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", "--preset", "tiny", "--steps", "3", "--out", str(out), "--quiet"])
    return out, rc, stdout.getvalue(), stderr.getvalue()


def test_train_writes_checkpoint_metrics_and_plot(run):
    out, rc, stdout, stderr = run
    assert rc == 0
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "loss.png", "metrics.jsonl"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in rows)
    assert "held_out_bpb" in rows[-1]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert int(state.step) == 3 and cfg.name == "tiny" and cfg.train.steps == 3 and cfg.model == preset("tiny").model
    assert "loss" in stdout and "checkpoint.safetensors" in stdout
    assert stderr == "", "--quiet shows no progress bar"


def test_train_stochastic_flip_mode_keeps_no_counters(tmp_path, run, capsys):
    out = tmp_path / "stoch"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--flip-mode", "stochastic", "--out", str(out),
                 "--quiet"]) == 0
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert cfg.update.flip_mode == "stochastic" and int(state.step) == 2
    assert audit(state)["bytes_per_weight"] < 0.35
    capsys.readouterr()
    # a counter checkpoint cannot switch modes on resume: its layout belongs to its mode
    assert main(["train", "--resume", str(run[0] / "checkpoint.safetensors"), "--steps", "1", "--flip-mode",
                 "stochastic", "--out", str(tmp_path / "x"), "--quiet"]) != 0
    assert "--flip-mode stochastic differs from the checkpoint's 'counter'" in capsys.readouterr().err


def test_train_anneals_the_flip_threshold_and_resumes_with_its_schedule(tmp_path, capsys):
    """--flip-threshold-final anneals over the run's steps and is saved with the run; a resumed run keeps the
    schedule, and changing its end needs --anneal-steps (the schedule counts steps from the run's first)."""
    out = tmp_path / "anneal"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--flip-mode", "stochastic", "--flip-threshold", "8",
                 "--flip-threshold-final", "300", "--out", str(out), "--quiet"]) == 0
    _, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert (cfg.update.flip_threshold, cfg.update.flip_threshold_final, cfg.update.anneal_steps) == (8, 300, 2)
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["train", "--resume", ckpt, "--steps", "1", "--flip-threshold-final", "600", "--out",
                 str(tmp_path / "x"), "--quiet"]) != 0
    assert "needs --anneal-steps" in capsys.readouterr().err
    assert main(["train", "--resume", ckpt, "--steps", "1", "--flip-threshold-final", "600", "--anneal-steps", "9",
                 "--out", str(tmp_path / "y"), "--quiet"]) == 0
    state, cfg = checkpoint.load_run(tmp_path / "y" / "checkpoint.safetensors")
    assert int(state.step) == 3 and (cfg.update.flip_threshold_final, cfg.update.anneal_steps) == (600, 9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_train_step_kinds_refuse_what_they_cannot_run(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--steps", "1", "--step", "cuda-graph", "--device", "cpu",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert "--step cuda-graph needs a CUDA device, got cpu" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--steps", "1", "--step", "compiled", "--nproc", "2",
                 "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "data-parallel ranks run the eager step" in capsys.readouterr().err


@pytest.mark.slow
def test_train_compiled_step_dense_moe(tmp_path, capsys):
    """--step compiled trains the whole tiny preset (MoE on) with a batch above moe.dense_limit: the step raises
    the limit to the batch (the dense dispatch gives the sparse one's result) and the checkpoint records it."""
    out = tmp_path / "c"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--step", "compiled",
                 "--out", str(out), "--quiet"]) == 0
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    tc = preset("tiny").train
    assert 8 * tc.context > preset("tiny").model.moe.dense_limit
    assert int(state.step) == 2 and cfg.model.moe.dense_limit == 8 * tc.context
    assert "next-byte loss" in capsys.readouterr().out


def test_train_four_bit_counters_and_their_resume_rules(tmp_path, run, capsys):
    out = tmp_path / "nib"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--counter-bits", "4", "--flip-threshold", "6",
                 "--out", str(out), "--quiet"]) == 0
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert (cfg.update.counter_bits, cfg.update.flip_threshold, cfg.update.flip_mode) == (4, 6, "counter")
    assert audit(state)["bytes_per_weight"] < audit(init_model(preset("tiny")))["bytes_per_weight"] - 0.49
    capsys.readouterr()
    cases = [  # (arguments, the error they give)
        (["--preset", "tiny", "--counter-bits", "4"], "flip_threshold must be at most 7 with 4-bit counters"),
        (["--resume", str(out / "checkpoint.safetensors"), "--counter-bits", "8"],
         "--counter-bits 8 differs from the checkpoint's 4"),
        (["--resume", str(run[0] / "checkpoint.safetensors"), "--counter-bits", "4", "--flip-threshold", "6"],
         "--counter-bits 4 differs from the checkpoint's 8"),
        (["--resume", str(out / "checkpoint.safetensors"), "--flip-threshold", "9"], "at most 7"),
    ]
    for args, error in cases:
        assert main(["train", *args, "--steps", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2, args
        assert error in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists()


def test_generate_continues_the_prompt(run, capsys):
    ckpt = str(run[0] / "checkpoint.safetensors")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "The ", "--max-bytes", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ") and text.endswith("\n")
    body = text[:-1]
    # 12 sampled bytes follow the prompt (an invalid UTF-8 byte prints as U+FFFD, 3 bytes)
    assert len("The ") < len(body) and len(body.encode("utf-8")) <= len("The ") + 3 * 12
    # same seed, same text; max-bytes 0 gives the prompt alone
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "The ", "--max-bytes", "12"]) == 0
    assert capsys.readouterr().out == text
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "abc", "--max-bytes", "0"]) == 0
    assert capsys.readouterr().out == "abc\n"


def test_audit_preset_json(capsys):
    assert main(["audit", "--preset", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = audit(init_model(preset("tiny"), torch.Generator().manual_seed(0)))
    assert report["ternary_weights"] == expected["ternary_weights"] == 294_368
    assert report["state_bytes"] == expected["state_bytes"]
    assert report["trainable_float_params"] == 0 and report["sidecars"] == {}


def test_audit_checkpoint(run, capsys):
    ckpt = str(run[0] / "checkpoint.safetensors")
    assert main(["audit", "--checkpoint", ckpt]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and "294,368" in table
    assert main(["audit", "--checkpoint", ckpt, "--json", "--strict"]) == 0
    assert json.loads(capsys.readouterr().out)["ternary_weights"] == 294_368


@pytest.mark.parametrize("argv,message", [
    (["audit", "--preset", "nonexistent"], "unknown preset 'nonexistent'; known: 3b, small, tiny"),
    (["train", "--preset", "nonexistent", "--steps", "1", "--quiet"], "unknown preset 'nonexistent'"),
    (["audit", "--checkpoint", "{tmp}/missing.safetensors"], "no checkpoint at"),
    (["generate", "--checkpoint", "{tmp}/missing.safetensors"], "no checkpoint at"),
    (["generate", "--checkpoint", "{tmp}/garbage.safetensors"], "truncated or not a safetensors"),
    (["train", "--steps", "1", "--quiet", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/o"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage" * 10)
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"arbfn {argv[0]}: error: ") and message in lines[0]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bogus-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate"])  # --checkpoint is required
    assert e.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_installed_console_script():
    script = shutil.which("arbfn", path=str(Path(sys.executable).parent)) or shutil.which("arbfn")
    assert script, "the `arbfn` console script is not installed (pip install -e .)"
    proc = subprocess.run([script, "audit", "--preset", "tiny", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ternary_weights"] == 294_368 and report["trainable_float_params"] == 0
