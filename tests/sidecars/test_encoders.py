"""Sidecar encoders: pixels / audio / frames -> features with the shapes the sequencers and the VideoHead take,
int8 features close to the float model's, no gradients, clear errors on bad inputs."""

import pytest
import torch

from sidecars import audio_frames, encode_audio, encode_frames, encode_image, load_sidecars, vision_patches
from sidecars.tiny import TINY_FRAME_SIZE, TINY_IMAGE_SIZE

G = torch.Generator().manual_seed(0)
INPUTS = {"image": torch.rand(2, 3, 48, 40, generator=G),  # resized to the sidecar's image size
          "audio": torch.randn(2, 4000, generator=G) * 0.1,
          "video": torch.rand(2, 3, TINY_FRAME_SIZE, TINY_FRAME_SIZE, generator=G)}
ENCODERS = {"image": encode_image, "audio": encode_audio, "video": encode_frames}


@pytest.fixture(scope="module")
def floats(tiny_dir) -> dict:
    return load_sidecars(tiny_dir, ("image", "audio", "video"), quantize_weights=None, image_size=TINY_IMAGE_SIZE)


def test_feature_shapes_follow_the_sidecar_configs(loaded):
    image = encode_image(loaded["image"], INPUTS["image"])
    assert vision_patches(loaded["image"]) == (TINY_IMAGE_SIZE // 8) ** 2 == 16
    assert image.shape == (2, 16, loaded["image"].config.hidden_size) and image.dtype == torch.float32
    frames = encode_audio(loaded["audio"], INPUTS["audio"])
    assert audio_frames(4000) == 9 and frames.shape == (2, 9, loaded["audio"].config.hidden_size)
    assert encode_frames(loaded["video"], INPUTS["video"]).shape == (2, 16, 1, 32, 32)  # the VideoHead's latent


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_int8_features_track_the_float_model(name, loaded, floats):
    q, f = (ENCODERS[name](m[name], INPUTS[name]) for m in (loaded, floats))
    assert not q.requires_grad and bool(torch.isfinite(q).all())
    rel = (q - f).norm() / f.norm()
    assert 0 < rel < 0.05, f"{name}: int8 features differ from float by {rel:.3f} (relative)"


def test_frames_encode_to_the_scaled_latent_mean(floats):
    vae = floats["video"]
    expected = vae.encode(INPUTS["video"] * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    assert vae.config.scaling_factor != 1 and torch.allclose(encode_frames(vae, INPUTS["video"])[:, :, 0], expected)


def test_audio_frame_count_matches_the_encoder(loaded):
    for samples in (895, 1283, 16_000):
        assert encode_audio(loaded["audio"], torch.zeros(1, samples)).shape[1] == audio_frames(samples)
    assert audio_frames(894) == 0 and audio_frames(14_400) == 36  # the original smoke's 36 positions


@pytest.mark.parametrize("name, bad, match", [
    ("image", torch.rand(2, 1, 32, 32), r"pixels must be \[B, 3, H, W\]"),
    ("image", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "pixels must be a float tensor"),
    ("audio", torch.zeros(2, 894), "samples >= 895"),
    ("audio", torch.zeros(2, 1, 4000), r"waveform must be \[B, samples\]"),
    ("video", torch.rand(2, 64, 64), r"frames must be \[B, 3, H, W\]"),
])
def test_bad_inputs(name, bad, match, loaded):
    with pytest.raises((ValueError, TypeError), match=match):
        ENCODERS[name](loaded[name], bad)
