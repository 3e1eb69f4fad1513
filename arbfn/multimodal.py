"""The eager bridge from raw media to the pure train step: frozen sidecars turn pixels, audio and video frames
into the feature tensors a batch carries, and the model config takes its sequencer widths from them.

The sidecars (``sidecars``, an optional extra, imported here only) stay outside the state and outside any
compiled graph (optimum-quanto does not compile): call :func:`featurize` on a batch, then hand the result
to ``train_step`` / ``objective`` / ``CompiledTrainStep`` like any other batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

import sidecars
from arbfn.config import Config, ModelConfig, SequencerConfig

RAW_KEYS = {"image_pixels": ("image", "image_features", sidecars.encode_image),     # [B, 3, H, W] in [0, 1]
            "audio_waveform": ("audio", "audio_features", sidecars.encode_audio),  # [B, samples] at 16 kHz
            "video_frames": ("video", "video_latent", sidecars.encode_frames)}     # [B, 3, H, W] in [0, 1]
"""Raw batch key -> (the sidecar that encodes it, the batch key it becomes, the encoder)."""


def featurize(batch: dict[str, Any], loaded: dict[str, nn.Module]) -> dict[str, Any]:
    """``batch`` with each raw key of :data:`RAW_KEYS` replaced by its features, encoded by ``loaded[sidecar]``."""
    out = dict(batch)
    for raw, (name, key, encode) in RAW_KEYS.items():
        if raw not in out:
            continue
        if name not in loaded:
            raise ValueError(f"batch has {raw!r} but no {name} sidecar is loaded (loaded: {sorted(loaded)})")
        out[key] = encode(loaded[name], out.pop(raw))
    return out


def sequencer_config(loaded: dict[str, nn.Module], base: SequencerConfig = SequencerConfig()) -> SequencerConfig:
    """``base`` with the feature widths of the loaded image/audio sidecars (their ``config.hidden_size``)."""
    widths = {f"{m}_features": loaded[m].config.hidden_size for m in ("image", "audio") if m in loaded}
    return dataclasses.replace(base, **widths)


def multimodal_config(cfg: Config, loaded: dict[str, nn.Module]) -> Config:
    """``cfg`` with ``enable_image`` / ``enable_audio`` for the loaded sidecars and their feature widths."""
    m: ModelConfig = cfg.model
    model = dataclasses.replace(m, enable_image="image" in loaded, enable_audio="audio" in loaded,
                                sequencers=sequencer_config(loaded, m.sequencers))
    return dataclasses.replace(cfg, model=model)



def check_sidecars(cfg: ModelConfig, loaded: dict[str, nn.Module]) -> None:
    """Raise ValueError when a loaded sidecar's feature width differs from what the model's sequencer takes."""
    want = dataclasses.asdict(cfg.sequencers)
    for name, width in dataclasses.asdict(sequencer_config(loaded, cfg.sequencers)).items():
        if width != want[name] and getattr(cfg, f"enable_{name.split('_')[0]}"):
            raise ValueError(f"the loaded {name.split('_')[0]} sidecar gives {width}-wide features but the model's "
                             f"sequencer takes {want[name]} (sequencers.{name})")
