"""AOT-compiled inference (arbfn.export, `arbfn export`, `arbfn generate --compiled`).

One package is compiled per module (through the CLI, ~20 s on 2 cores) and shared by every test.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from arbfn import checkpoint, data
from arbfn.cli import main
from arbfn.config import preset
from arbfn.export import CompiledModelError, export_model, load_compiled
from arbfn.generate import _window, generate, sample
from arbfn.model import forward, init_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 16


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(state, checkpoint path, package path): a fresh tiny state exported by `arbfn export`."""
    tmp = tmp_path_factory.mktemp("export")
    state = init_model(preset("tiny"), torch.Generator().manual_seed(3))
    ckpt = checkpoint.save(state, tmp / "ckpt.safetensors")
    package = tmp / "tiny.pt2"
    rc, out, err = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(package), "--seq-len", str(SEQ_LEN)])
    assert rc == 0, err
    assert str(package) in out and package.is_file()
    return state, ckpt, package


_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from arbfn.export import load_compiled  # imports kernels (the ops) before loading

    package, inputs, out = sys.argv[1:4]
    model = load_compiled(package)
    torch.save([model(x) for x in torch.load(inputs)], out)
    print("loaded", model.batch_size, model.seq_len, model.config.d_model)
    """
)


@pytest.mark.slow
def test_fresh_process_matches_eager(exported, tmp_path):
    state, _, package = exported
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, data.NUM_BYTES, (1, SEQ_LEN), generator=g) for _ in range(2)]
    inputs.append(_window(data.encode("Hi").tolist(), SEQ_LEN)[None])  # left-padded with PAD
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(_LOAD_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "load.py", str(package), "inputs.pt", "out.pt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded 1 {SEQ_LEN} {state.config.d_model}" in proc.stdout
    outs = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        for x, got in zip(inputs, outs, strict=True):
            assert got.shape == (1, SEQ_LEN, state.config.vocab_size) and got.dtype == torch.float32
            for fixed in (True, False):  # the fixed-step and the eager halting loops (graph via unique)
                torch.testing.assert_close(got, forward(state, x, fixed_loops=fixed).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_loaded_metadata_and_input_validation(exported):
    state, _, package = exported
    model = load_compiled(package)
    assert (model.batch_size, model.seq_len, model.config) == (1, SEQ_LEN, state.config)
    ok = torch.zeros(1, SEQ_LEN, dtype=torch.int64)
    assert model(ok).shape == (1, SEQ_LEN, state.config.vocab_size)
    for bad, got in ((torch.zeros(2, SEQ_LEN, dtype=torch.int64), r"\[2, 16\]"),
                     (torch.zeros(1, SEQ_LEN - 1, dtype=torch.int64), r"\[1, 15\]"),
                     (torch.zeros(SEQ_LEN, dtype=torch.int64), r"\[16\]"),
                     (torch.zeros(1, SEQ_LEN, dtype=torch.int32), "torch.int32")):
        with pytest.raises(ValueError, match=r"expects ids of shape \[1, 16\] and dtype torch.int64, got .*" + got):
            model(bad)
    with pytest.raises(ValueError, match="token ids must be in 0..296"):
        model(torch.full((1, SEQ_LEN), 297, dtype=torch.int64))
    with pytest.raises(TypeError):
        model([[0] * SEQ_LEN])


@pytest.mark.slow
def test_damaged_packages_raise_clear_errors(exported, tmp_path):
    raw = exported[2].read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CompiledModelError, match="truncated or not an AOTInductor package"):
        load_compiled(truncated)
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    (tmp_path / "flipped.pt2").write_bytes(bytes(flipped))
    with pytest.raises(CompiledModelError, match="flipped.pt2"):
        load_compiled(tmp_path / "flipped.pt2")
    with pytest.raises(CompiledModelError, match="no compiled model"):
        load_compiled(tmp_path / "missing.pt2")
    rc, _, err = run_cli(["generate", "--compiled", str(truncated), "--max-bytes", "3"])
    assert rc == 2 and "truncated" in err


def test_export_rejects_shapes_it_cannot_compile(tmp_path):
    state = init_model(preset("tiny"), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="moe.dense_limit"):
        export_model(state, 4, 64, tmp_path / "x.pt2")  # 256 tokens: the sparse MoE dispatch
    for b, t in ((0, 8), (1, 0), (1, 65)):
        with pytest.raises(ValueError, match="batch_size >= 1 and 1 <= seq_len <= max_context"):
            export_model(state, b, t, tmp_path / "x.pt2")
    assert not (tmp_path / "x.pt2").exists()


@pytest.mark.slow
def test_cli_generate_compiled_equals_eager_with_the_same_window(exported):
    _, ckpt, package = exported
    args = ["--prompt", "The ", "--max-bytes", "20", "--seed", "5"]  # 4 + 20 > 16: the window slides
    rc, compiled, err = run_cli(["generate", "--compiled", str(package), *args])
    assert rc == 0, err
    rc, eager, err = run_cli(["generate", "--checkpoint", str(ckpt), "--window", str(SEQ_LEN), "--device", "cpu", *args])
    assert rc == 0, err
    assert compiled == eager and compiled.startswith("The ")
    rc, _, err = run_cli(["generate", "--compiled", str(package), "--window", "8", *args])
    assert rc == 2 and "--window" in err


def test_fixed_window_left_pads_and_slides():
    assert _window([7, 8], 4).tolist() == [data.PAD_ID, data.PAD_ID, 7, 8]
    assert _window([1, 2, 3, 4, 5], 3).tolist() == [3, 4, 5]
    state = init_model(preset("tiny"), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="window must be in 1..64"):
        generate(state, "a", 1, window=65)
    seen = []

    def spy(x):
        seen.append(x[0].tolist())
        return torch.zeros(1, x.shape[1], state.config.vocab_size)

    sample(spy, "ab", 3, 0.0, 0, 3, 64)  # greedy over zero logits samples byte 0
    a, b = data.encode("ab").tolist()
    assert seen == [[data.PAD_ID, a, b], [a, b, 0], [b, 0, 0]]


def _with_metadata(package: Path, out: Path, value: str | None) -> Path:
    """A copy of ``package`` whose arbfn metadata entry is ``value`` (None: removed)."""
    with zipfile.ZipFile(package) as z, zipfile.ZipFile(out, "w") as w:
        for info in z.infolist():
            raw = z.read(info)
            if info.filename.endswith("_metadata.json"):
                meta = json.loads(raw)
                meta.pop("arbfn")
                if value is not None:
                    meta["arbfn"] = value
                raw = json.dumps(meta).encode()
            w.writestr(info, raw)
    return out


@pytest.mark.slow
def test_foreign_or_mismatched_metadata_is_refused(exported, tmp_path):
    package = exported[2]
    meta = json.loads(load_compiled(package).runner.get_metadata()["arbfn"])
    cases = [(None, "without arbfn metadata"), ("{", "unreadable metadata"),
             (json.dumps({**meta, "format": "arbfn-aoti-0"}), "format 'arbfn-aoti-0', expected 'arbfn-aoti-1'"),
             (json.dumps({**meta, "input_dtype": "torch.int32"}), "compiled for dtypes torch.int32"),
             (json.dumps({k: v for k, v in meta.items() if k != "config"}), "KeyError")]
    for i, (value, message) in enumerate(cases):
        with pytest.raises(CompiledModelError, match=message):
            load_compiled(_with_metadata(package, tmp_path / f"m{i}.pt2", value))
    assert load_compiled(_with_metadata(package, tmp_path / "same.pt2", json.dumps(meta))).seq_len == SEQ_LEN
