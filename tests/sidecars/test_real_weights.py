"""The real sidecars (DINOv2-small, Moonshine-base, pig-vae) from their local folders, when they exist.

Looks in ``$ARBFN_SIDECAR_DIR`` (else ``~/.cache/arbfn/sidecars``) and skips, saying where, when a folder is
missing; never downloads. Checks the original's figures: DINOv2-small int8 is 1 QConv2d + 72 QLinear and
gives 256 patches of 384 at 224 px (254 image positions); Moonshine-base's encoder gives 36 frames of 416
for 0.9 s of audio; with 8 text bytes the shared VQ sees (1, 298) indices, as in the original smoke.
"""

import pytest
import torch

from arbfn.config import preset
from arbfn.model import forward, init_model
from arbfn.multimodal import featurize, multimodal_config
from sidecars import default_sidecar_dir, load_sidecars, sidecar_folders, sidecar_report

pytestmark = pytest.mark.sidecar_weights


def _require(name: str):
    folder = sidecar_folders(default_sidecar_dir())[name]
    if not (folder / "config.json").is_file():
        pytest.skip(f"no real {name} sidecar at {folder} (set ARBFN_SIDECAR_DIR to a folder holding "
                    "dinov2-small/, moonshine-base/, pig-vae/)")
    return load_sidecars(default_sidecar_dir(), (name,))[name]


def test_real_dinov2_small_int8():
    model = _require("image")
    assert sidecar_report(model)["quantized_modules"] == {"QConv2d": 1, "QLinear": 72}
    assert featurize({"image_pixels": torch.rand(1, 3, 224, 224)}, {"image": model})["image_features"].shape == (
        1, 256, 384)


def test_real_moonshine_base_encoder_int8():
    model = _require("audio")
    assert sidecar_report(model)["quantized_modules"] == {"QLinear": 48}  # 8 encoder layers x 6
    frames = featurize({"audio_waveform": 0.1 * torch.randn(1, 14_400)}, {"audio": model})["audio_features"]
    assert frames.shape == (1, 36, 416)


def test_real_pig_vae_int8():
    model = _require("video")
    report = sidecar_report(model)
    assert report["quantized_int8"] and report["quantized_modules"].get("QConv2d", 0) > 0
    latent = featurize({"video_frames": torch.rand(1, 3, 256, 256)}, {"video": model})["video_latent"]
    assert latent.shape[:3] == (1, model.config.latent_channels, 1)


def test_real_multimodal_smoke_indexes_298_codes():
    loaded = {"image": _require("image"), "audio": _require("audio")}
    cfg = multimodal_config(preset("tiny"), loaded)
    batch = featurize({"image_pixels": torch.rand(1, 3, 224, 224), "audio_waveform": 0.1 * torch.randn(1, 14_400)},
                      loaded)
    out = forward(init_model(cfg, torch.Generator().manual_seed(0)), torch.arange(8).unsqueeze(0),
                  features={"image": batch["image_features"], "audio": batch["audio_features"]})
    assert out.aux["vq_indices"].shape == (1, 254 + 36 + 8)
