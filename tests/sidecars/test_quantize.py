"""Sidecar loaders and quantization: int8 module classes, frozen params, metadata flags, the bf16 fallback,
frozen float without quantization, clear errors for missing folders, and no network."""

import socket
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from sidecars import load_audio, load_sidecars, load_vision, sidecar_folders, sidecar_report
from sidecars.quantize import load_frozen
from sidecars.tiny import TINY_IMAGE_SIZE

LOADERS = {"image": lambda f, q: load_vision(f, q, image_size=TINY_IMAGE_SIZE), "audio": load_audio}


def float_layers(model: nn.Module) -> dict[str, int]:
    """What quanto should replace: nn.Linear -> QLinear, nn.Conv2d -> QConv2d."""
    counts = {"QLinear": sum(type(m) is nn.Linear for m in model.modules()),
              "QConv2d": sum(type(m) is nn.Conv2d for m in model.modules())}
    return {k: v for k, v in counts.items() if v}


@pytest.fixture(scope="module")
def floats(tiny_dir) -> dict[str, nn.Module]:
    return load_sidecars(tiny_dir, ("image", "audio", "video"), quantize_weights=None, image_size=TINY_IMAGE_SIZE)


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_int8_replaces_every_linear_and_conv2d_and_freezes(name, loaded, floats):
    model, report = loaded[name], sidecar_report(loaded[name])
    assert report["quantized_modules"] == float_layers(floats[name]) != {}
    assert float_layers(model) == {}  # no float Linear/Conv2d left behind
    assert (model._arb_quantize_requested, model._arb_quantized, model._arb_quantized_int8) == ("int8", True, True)
    assert model._arb_quantize_fallback is None and not model.training
    assert all(not p.requires_grad for p in model.parameters()) and report["trainable_float_params"] == 0
    quantized = [p for p in model.parameters() if is_traceable_wrapper_subclass(p)]
    assert quantized and all(p._data.dtype == torch.int8 for p in quantized)
    assert report["quantized_params"] == sum(p.numel() for p in quantized)
    # int8 data plus one fp32 scale per output row: about a quarter of the fp32 bytes
    assert report["quantized_params"] <= report["quantized_bytes"] < 2 * report["quantized_params"]
    n_float = sum(p.numel() for p in model.parameters() if not is_traceable_wrapper_subclass(p))
    assert report["frozen_float_params"] == n_float and report["frozen_float_bytes"] == 4 * n_float


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_quantize_none_freezes_the_float_model_and_says_so(name, floats):
    model, report = floats[name], sidecar_report(floats[name])
    assert (model._arb_quantize_requested, model._arb_quantized, model._arb_quantized_int8) == (None, False, False)
    assert report["quantized_modules"] == {} and report["quantized_params"] == 0
    assert report["frozen_float_params"] == sum(p.numel() for p in model.parameters())
    assert report["trainable_float_params"] == 0 and not model.training


@pytest.mark.parametrize("name", ["image", "audio"])
def test_missing_quanto_falls_back_to_frozen_bf16_and_records_it(name, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import optimum.quanto -> ImportError
    model = LOADERS[name](sidecar_folders(tiny_dir)[name], "int8")
    assert (model._arb_quantize_requested, model._arb_quantized, model._arb_quantized_int8) == ("int8", False, False)
    assert "optimum-quanto is not importable" in model._arb_quantize_fallback and "bf16" in model._arb_quantize_fallback
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    report = sidecar_report(model)
    assert report["fallback"] == model._arb_quantize_fallback and report["float_dtypes"] == ["bfloat16"]
    assert report["trainable_float_params"] == 0 and report["quantized_modules"] == {}


def test_quanto_failing_midway_reloads_a_clean_float_model(tiny_dir, monkeypatch):
    import optimum.quanto as quanto

    real = quanto.quantize

    def quantize_then_fail(model, **kwargs):
        real(model, **kwargs)  # modules already replaced when it fails
        raise RuntimeError("boom on a module")

    monkeypatch.setattr(quanto, "quantize", quantize_then_fail)
    model = load_vision(sidecar_folders(tiny_dir)["image"], image_size=TINY_IMAGE_SIZE)
    assert "failed (RuntimeError: boom on a module)" in model._arb_quantize_fallback and not model._arb_quantized
    assert sidecar_report(model)["quantized_modules"] == {} and float_layers(model) != {}


def test_bad_quantize_choice():
    with pytest.raises(ValueError, match="quantize_weights must be one of"):
        load_frozen(nn.Linear(2, 2), "int4")


def test_missing_folder_and_missing_weights_say_what_to_put_where(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/dinov2-small does not exist: put the save_pretrained "
                                                r"files of facebook/dinov2-small there"):
        load_sidecars(tmp_path / "nowhere", ("image",))
    empty = tmp_path / "moonshine-base"
    empty.mkdir()
    (empty / "config.json").write_text((sidecar_folders(tiny_dir)["audio"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"lacks config.json or weights .*UsefulSensors/moonshine-base"):
        load_audio(empty)
    with pytest.raises(ValueError, match="unknown sidecars"):
        load_sidecars(tiny_dir, ("smell",))


def test_loading_never_touches_the_network(tiny_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a sidecar loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_sidecars(tiny_dir, ("image", "audio", "video"), image_size=TINY_IMAGE_SIZE).keys() == {
        "image", "audio", "video"}
