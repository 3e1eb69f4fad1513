"""The audit's sidecar sections and strict rules, and `arbfn audit --image --audio --sidecar-dir DIR`."""

import dataclasses
import json
import sys

import pytest
import torch

from arbfn import checkpoint
from arbfn.audit import AuditError, audit, format_audit
from arbfn.cli import main
from arbfn.config import SequencerConfig, preset
from arbfn.model import init_model
from arbfn.multimodal import multimodal_config
from sidecars import load_vision, sidecar_folders, sidecar_report
from sidecars.tiny import TINY_IMAGE_SIZE


@pytest.fixture(scope="module")
def state(loaded):
    return init_model(multimodal_config(preset("tiny"), loaded))  # shape-only


def test_audit_reports_each_sidecar_apart_from_the_core(state, loaded):
    core = audit(state)
    r = audit(state, strict=True, sidecars=loaded)
    assert set(r["sidecars"]) == {"image", "audio", "video"}
    assert r["sidecars"]["image"] == sidecar_report(loaded["image"])
    assert r["sidecars"]["image"]["quantized_modules"] == {"QConv2d": 1, "QLinear": 12}  # 2 layers x 6 + patch conv
    assert r["sidecars"]["audio"]["quantized_modules"] == {"QLinear": 6}  # encoder only: 1 layer x 6
    for k in ("ternary_weights", "state_bytes", "trainable_float_params", "float_buffers", "areas"):
        assert r[k] == core[k]  # sidecars never count as core state
    assert r["frozen_float_params"] == sum(s["frozen_float_params"] for s in r["sidecars"].values()) > 0
    assert {"image", "audio"} <= set(r["areas"]) and r["trainable_float_params"] == 0
    text = format_audit(r)
    assert "sidecar image (Dinov2Model): requested int8, int8" in text and "QConv2d 1, QLinear 12" in text


def test_strict_fails_on_a_sidecar_that_is_not_int8(state, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    fallback = load_vision(sidecar_folders(tiny_dir)["image"], image_size=TINY_IMAGE_SIZE)
    r = audit(state, sidecars={"image": fallback})
    assert "NOT int8: optimum-quanto is not importable" in format_audit(r)
    with pytest.raises(AuditError, match="sidecar image: int8 was requested but it is not int8"):
        audit(state, strict=True, sidecars={"image": fallback})
    unrequested = load_vision(sidecar_folders(tiny_dir)["image"], None, image_size=TINY_IMAGE_SIZE)
    audit(state, strict=True, sidecars={"image": unrequested})  # frozen float, not asked to be int8: allowed


def test_strict_fails_on_any_trainable_sidecar_param(state, tiny_dir):
    model = load_vision(sidecar_folders(tiny_dir)["image"], image_size=TINY_IMAGE_SIZE)  # a private copy
    model.layernorm.weight.requires_grad_(True)
    with pytest.raises(AuditError, match=f"sidecar image: {model.layernorm.weight.numel()} trainable params"):
        audit(state, strict=True, sidecars={"image": model})


def audit_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`arbfn audit ARGV` in-process: (exit code, stdout, stderr)."""
    rc = main(["audit", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_audit_with_sidecars(tiny_dir, capsys):
    rc, out, err = audit_cli(capsys, "--preset", "tiny", "--image", "--audio", "--sidecar-dir", str(tiny_dir),
                             "--json", "--strict")
    assert rc == 0, err
    r = json.loads(out)
    assert set(r["sidecars"]) == {"image", "audio"} and r["sidecars"]["image"]["quantized_int8"]
    assert r["areas"]["image"]["ternary_weights"] == 64 * 3 * 32 and r["areas"]["audio"]["ternary_weights"] == 64 * 32
    rc, out, _ = audit_cli(capsys, "--preset", "tiny", "--audio", "--vae", "--sidecar-dir", str(tiny_dir))
    assert rc == 0 and "sidecar video (AutoencoderKL)" in out and "sidecar audio (MoonshineEncoder)" in out
    assert "image" not in out.split("TOTAL")[0]  # no image sequencer without --image


def test_cli_audit_names_a_missing_sidecar_folder(tmp_path, capsys):
    rc, _, err = audit_cli(capsys, "--preset", "tiny", "--image", "--sidecar-dir", str(tmp_path))
    assert rc == 2 and f"{tmp_path}/dinov2-small does not exist" in err


def test_cli_audit_checks_a_checkpoint_against_its_sidecars(tiny_dir, loaded, tmp_path, capsys):
    cfg = multimodal_config(preset("tiny"), {"image": loaded["image"]})
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sequencers=SequencerConfig(image_features=48)))
    path = checkpoint.save(init_model(bad, torch.Generator().manual_seed(0)), tmp_path / "c.safetensors", bad)
    rc, _, err = audit_cli(capsys, "--checkpoint", str(path), "--image", "--sidecar-dir", str(tiny_dir))
    assert rc == 2 and "gives 32-wide features but the model's sequencer takes 48" in err
