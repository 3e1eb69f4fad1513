"""Image/audio sequencers and the multimodal model: windows and shapes, modality positions before the text in
one VQ sequence, feature checks, checkpoints, and a full multimodal train step on tiny int8 sidecars."""

import dataclasses

import pytest
import torch

from arbfn import checkpoint, data
from arbfn.audit import audit
from arbfn.config import ModelConfig, SequencerConfig, UpdateConfig, preset
from arbfn.layers.sequencers import audio_sequencer, image_sequencer, init_audio_sequencer, init_image_sequencer
from arbfn.model import forward, init_model
from arbfn.multimodal import featurize, multimodal_config
from arbfn.ternary import TernaryWeight, weights
from arbfn.train import train_step

SEQ = SequencerConfig(image_features=24, audio_features=40)
TINY = preset("tiny")
MM = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, enable_image=True, enable_audio=True,
                                                         sequencers=SEQ))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(b: int = 2, patches: int = 16, frames: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"image": torch.randn(b, patches, SEQ.image_features, generator=g),
            "audio": torch.randn(b, frames, SEQ.audio_features, generator=g)}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return data.sample_batch(data.load_corpus(), 2, 16, gen(1))


@pytest.fixture(scope="module")
def mm_state():
    return init_model(MM, gen(0))


def test_image_window_is_valid_and_local():
    p = init_image_sequencer(24, 64, 32, gen(0))
    assert set(p) == {"proj"} and isinstance(p["proj"], TernaryWeight) and p["proj"].in_features == 3 * 24
    f = torch.randn(2, 17, 24, generator=gen(1))
    y = image_sequencer(p, f)
    assert y.shape == (2, 15, 64)  # 17 patches - 3 + 1 (256 -> 254 at 224 px)
    g = f.clone()
    g[:, 7] += 1.0
    changed = (image_sequencer(p, g) - y).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [5, 6, 7]  # positions whose window holds patch 7


def test_audio_projects_each_frame():
    p = init_audio_sequencer(40, 64, 32, gen(0))
    f = torch.randn(1, 36, 40, generator=gen(1))
    y = audio_sequencer(p, f)
    assert y.shape == (1, 36, 64)  # the original smoke's (1, 36, 512) at width 512
    assert torch.allclose(audio_sequencer(p, f[:, 10:11]), y[:, 10:11], atol=1e-6)
    assert torch.allclose(audio_sequencer(p, 3 * f), y, atol=1e-5)  # RMS-normalised features: scale-free


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 2, 24), r"\[B, F >= 3, 24\]"),
    (torch.randn(2, 16, 25), r"\[B, F >= 3, 24\]"),
    (torch.randn(16, 24), r"\[B, F >= 3, 24\]"),
    (torch.ones(2, 16, 24, dtype=torch.int64), "features must be a float tensor"),
])
def test_sequencer_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        image_sequencer(init_image_sequencer(24, 64, 32, gen(0)), bad)


def test_small_preset_with_image_and_audio_is_counted_shape_only():
    small = preset("small").model
    r = audit(init_model(dataclasses.replace(small, enable_image=True, enable_audio=True)), strict=True)
    text_only = audit(init_model(small))
    assert r["areas"]["image"]["ternary_weights"] == 512 * 3 * 384  # DINOv2-small width, window 3
    assert r["areas"]["audio"]["ternary_weights"] == 512 * 416  # Moonshine-base width
    assert r["areas"]["bridge"]["ternary_weights"] == 3 * 512 * 512  # one projection per modality
    assert r["ternary_weights"] - text_only["ternary_weights"] == 512 * (3 * 384 + 416 + 2 * 512)


def test_modalities_precede_the_text_in_one_vq_sequence(mm_state, ids):
    assert list(mm_state.params["bridge"]) == ["image", "audio", "text"]
    out = forward(mm_state, ids, features=features())
    assert out.logits.shape == (2, 16, 297) and out.hidden.shape == (2, 16, 64) and out.router.shape == (2, 16, 3)
    assert out.aux["vq_indices"].shape == (2, 14 + 9 + 16) and out.aux["memory_slots"].shape == (2, 39)
    other = forward(mm_state, ids, features={**features(), "image": features(seed=5)["image"]})
    assert not torch.allclose(out.logits, other.logits)  # text positions attend to the image positions
    new_text = forward(mm_state, ids.flip(1), features=features())
    assert torch.equal(new_text.aux["vq_indices"][:, :23], out.aux["vq_indices"][:, :23])  # ... which precede it
    assert not torch.equal(new_text.aux["vq_indices"][:, 23:], out.aux["vq_indices"][:, 23:])
    text_only = forward(mm_state, ids)  # features are optional: a multimodal model still reads text alone
    assert text_only.logits.shape == (2, 16, 297) and text_only.aux["vq_indices"].shape == (2, 16)
    only_audio = forward(mm_state, ids, features={"audio": features()["audio"]})
    assert only_audio.aux["vq_indices"].shape == (2, 9 + 16)


@pytest.mark.parametrize("feats, match", [
    ({"smell": torch.zeros(2, 4, 8)}, "unknown feature modality 'smell'"),
    ({"image": torch.zeros(3, 16, 24)}, r"image features must be \[2, F, d_feature\]"),
])
def test_bad_features(feats, match, mm_state, ids):
    with pytest.raises(ValueError, match=match):
        forward(mm_state, ids, features=feats)


def test_features_for_a_disabled_modality(ids):
    with pytest.raises(ValueError, match="image features given but enable_image is off"):
        forward(init_model(TINY, gen(0)), ids, features={"image": features()["image"]})


def test_multimodal_checkpoint_round_trip(mm_state, ids, tmp_path):
    path = checkpoint.save(mm_state, tmp_path / "mm.safetensors", MM)
    state, cfg = checkpoint.load_run(path)
    assert cfg == MM and cfg.model.sequencers == SEQ
    f = features()
    assert torch.equal(forward(state, ids, features=f).logits, forward(mm_state, ids, features=f).logits)


@pytest.fixture(scope="module")
def tiny_sidecars(tmp_path_factory):
    for module in ("transformers", "diffusers", "optimum.quanto"):
        pytest.importorskip(module, reason="the sidecars extra is not installed (pip install -e .[sidecars])")
    from sidecars import load_sidecars
    from sidecars.tiny import TINY_IMAGE_SIZE, save_tiny_sidecars

    folder = save_tiny_sidecars(tmp_path_factory.mktemp("sidecars"))
    return load_sidecars(folder, ("image", "audio", "video"), image_size=TINY_IMAGE_SIZE)


def test_full_multimodal_train_step_on_tiny_int8_sidecars(tiny_sidecars, ids):
    cfg = dataclasses.replace(multimodal_config(TINY, tiny_sidecars), update=UpdateConfig(1, 1))
    assert cfg.model.sequencers.image_features == tiny_sidecars["image"].config.hidden_size == 32
    g = gen(3)
    raw = {"bytes": ids, "image_pixels": torch.rand(2, 3, 32, 32, generator=g),
           "audio_waveform": 0.1 * torch.randn(2, 4000, generator=g),
           "video_frames": torch.rand(2, 3, 64, 64, generator=g),
           "video_noise": torch.randn(2, 16, 1, 32, 32, generator=g), "video_step": torch.tensor([0, 3]),
           "audio_tokens": torch.randint(0, 289, (2, 10), generator=g)}
    batch = featurize(raw, tiny_sidecars)
    assert set(batch) == {"bytes", "image_features", "audio_features", "video_latent", "video_noise", "video_step",
                          "audio_tokens"}
    state = init_model(cfg, gen(0))
    new, m = train_step(state, batch, cfg)
    assert {"byte_loss", "commitment", "ponder", "video_loss", "talker_loss"} <= set(m)
    assert all(bool(torch.isfinite(v)) for v in m.values()) and int(new.step) == 1
    for area in ("image", "audio", "bridge"):
        moved = [not torch.equal(a.t_accum, b.t_accum) for a, b in zip(weights(new.params[area]),
                                                                      weights(state.params[area]))]
        assert all(moved), f"{area}: a weight got no votes from the multimodal step"
    assert int(new.params["vq"]["usage"].sum()) > int(state.params["vq"]["usage"].sum())
    r = audit(new, strict=True, sidecars=tiny_sidecars)  # state still float-free, sidecars int8 and frozen
    assert r["trainable_float_params"] == 0 and all(s["quantized_int8"] for s in r["sidecars"].values())


def test_featurize_needs_the_sidecar(ids):
    with pytest.raises(ValueError, match="batch has 'image_pixels' but no image sidecar is loaded"):
        featurize({"bytes": ids, "image_pixels": torch.rand(2, 3, 32, 32)}, {})


def test_config_serialises_the_sequencers():
    m = ModelConfig(enable_image=True, sequencers=SEQ)
    assert ModelConfig.from_dict(dataclasses.asdict(m)) == m
    with pytest.raises(ValueError, match="SequencerConfig.image_window must be >= 1"):
        SequencerConfig(image_window=0)
