"""The audio sidecar: the frozen int8 encoder of Moonshine-base, turning 16 kHz audio into frames.

Expects ``<sidecar_dir>/moonshine-base`` to hold the transformers ``save_pretrained`` files of
``UsefulSensors/moonshine-base`` (config.json, model.safetensors; a ``MoonshineForConditionalGeneration``
or ``MoonshineModel`` checkpoint). Only the encoder is kept: the ARB model consumes its frames, and the
unused decoder would add 80 of the original's 128 QLinear. The conv stem downsamples by 384 samples
(about 41.7 frames per second); frames are [B, F, hidden_size] ([B, F, 416] for Moonshine-base).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sidecars.quantize import load_frozen, require_folder

FOLDER = "moonshine-base"
MODEL_ID = "UsefulSensors/moonshine-base"
SAMPLE_RATE = 16_000


def _encoder(path: Path) -> nn.Module:
    from transformers import MoonshineModel

    return MoonshineModel.from_pretrained(path, local_files_only=True).encoder


def load_audio(folder: str | Path, quantize_weights: str | None = "int8",
               device: torch.device | str | None = None) -> nn.Module:
    """A frozen (int8 by default) ``MoonshineEncoder`` from a local folder."""
    path = require_folder(folder, f"the save_pretrained files of {MODEL_ID}",
                          f"MoonshineForConditionalGeneration.from_pretrained('{MODEL_ID}')"
                          f".save_pretrained('{folder}') on a networked machine")
    return load_frozen(lambda: _encoder(path), quantize_weights, device)


def audio_frames(samples: int) -> int:
    """Encoder frames for ``samples`` audio samples (its three convs: k127/s64, k7/s3, k3/s2); < 1: too short."""
    n = samples
    for k, s in ((127, 64), (7, 3), (3, 2)):
        n = (n - k) // s + 1 if n >= k else 0
    return n


@torch.no_grad()
def encode_audio(model: nn.Module, waveform: torch.Tensor) -> torch.Tensor:
    """Mono 16 kHz audio [B, samples] -> frames [B, audio_frames(samples), hidden] (fp32, model's device)."""
    if not isinstance(waveform, torch.Tensor) or not waveform.is_floating_point():
        raise TypeError(f"waveform must be a float tensor, got {getattr(waveform, 'dtype', type(waveform).__name__)}")
    if waveform.dim() != 2 or audio_frames(waveform.shape[1]) < 1:
        raise ValueError(f"waveform must be [B, samples] with samples >= 895 (one frame), got {tuple(waveform.shape)}")
    weight = next(model.parameters())
    return model(waveform.to(weight.device, weight.dtype)).last_hidden_state.float()
