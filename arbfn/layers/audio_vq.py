"""AudioVQEncoder: ternary conv1d blocks -> ternary proj -> ternary VQ codebook -> ternary out_proj.

Raw audio [B, samples] is downsampled by strided ternary convs (GELU between blocks; block i pads by
``(k_i - s_i) // 2``, so with the default kernels each block divides the length exactly by its stride),
projected to ``code_dim``, snapped to one code per frame, and mapped to logits over ``n_tokens`` audio
tokens. Every weight is ternary; the only other state is the int16 usage counter of the codebook
(update it with ``arbfn.layers.vq.update_vq_counters(params, indices)``).

Defaults (:data:`AUDIO_VQ_DEFAULT`): hop 5*4*4*5 = 400 samples per frame, so the smoke input of
:data:`SMOKE_SAMPLES` = 1600 samples gives logits (1, 4, 289) and indices (1, 4); 402,752 ternary weights
(convs 288 + 16,384 + 65,536 + 294,912, proj 8,192, codebook 8,192, out_proj 9,248; the original had 404,864).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from arbfn.layers.conv import conv1d, init_conv1d
from arbfn.layers.vq import quantize
from arbfn.ternary import init_ternary, linear


@dataclasses.dataclass(frozen=True)
class AudioVQConfig:
    """Shape of the encoder: conv channels / kernel sizes / strides per block, codebook, token vocabulary."""

    channels: tuple[int, ...] = (32, 64, 128, 256)
    kernel_sizes: tuple[int, ...] = (9, 8, 8, 9)
    strides: tuple[int, ...] = (5, 4, 4, 5)
    code_dim: int = 32
    n_codes: int = 256
    n_tokens: int = 289

    @property
    def hop(self) -> int:
        """Samples per output frame."""
        return math.prod(self.strides)

    def frames(self, samples: int) -> int:
        """Output frames for an input of ``samples`` samples (< 1 means too short)."""
        n = samples
        for k, s in zip(self.kernel_sizes, self.strides):
            n = (n + 2 * ((k - s) // 2) - k) // s + 1
        return n


AUDIO_VQ_DEFAULT = AudioVQConfig()
SMOKE_SAMPLES = 1600  # -> 4 frames with the defaults


def init_audio_vq(channels: tuple[int, ...], kernel_sizes: tuple[int, ...], strides: tuple[int, ...], code_dim: int,
                  n_codes: int, n_tokens: int, group_size: int, generator: torch.Generator | None) -> dict:
    """{"convs": [conv per block], "proj": [code_dim, C_last], "codebook": [n_codes, code_dim] (unit-scale),
    "out_proj": [n_tokens, code_dim], "usage": int16 [n_codes]}."""
    if not channels or not len(channels) == len(kernel_sizes) == len(strides):
        raise ValueError("init_audio_vq needs one channel count, kernel size and stride per block")
    if any(s < 1 or k < s for k, s in zip(kernel_sizes, strides)):
        raise ValueError(f"init_audio_vq needs 1 <= stride <= kernel size, got {kernel_sizes}, {strides}")
    if min(*channels, code_dim, n_codes, n_tokens) < 1:
        raise ValueError("init_audio_vq needs positive channels, code_dim, n_codes and n_tokens")
    c_in = (1, *channels[:-1])
    return {"convs": [init_conv1d(ci, co, k, group_size, generator)
                      for ci, co, k in zip(c_in, channels, kernel_sizes)],
            "proj": init_ternary(code_dim, channels[-1], group_size, generator),
            "codebook": init_ternary(n_codes, code_dim, group_size, generator, exponent=0),
            "out_proj": init_ternary(n_tokens, code_dim, group_size, generator),
            "usage": torch.zeros(n_codes, dtype=torch.int16, device="meta" if generator is None else None)}


def init_audio_vq_default(group_size: int, generator: torch.Generator | None) -> dict:
    """:func:`init_audio_vq` with :data:`AUDIO_VQ_DEFAULT`."""
    return init_audio_vq(**dataclasses.asdict(AUDIO_VQ_DEFAULT), group_size=group_size, generator=generator)


def audio_vq(p: dict, audio: torch.Tensor, config: AudioVQConfig = AUDIO_VQ_DEFAULT, exact_limit: int = 65536,
             n_candidates: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """audio [B, samples] or [B, 1, samples] -> (logits [B, frames, n_tokens], indices [B, frames], commitment).

    ``config`` supplies the strides and paddings, which the params (integers only) do not carry.
    """
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise TypeError("audio_vq expects a floating-point audio tensor")
    if audio.dim() == 2:
        audio = audio.unsqueeze(1)
    if audio.dim() != 3 or audio.shape[1] != 1:
        raise ValueError(f"audio_vq expects [B, samples] or [B, 1, samples], got {tuple(audio.shape)}")
    if len(p["convs"]) != len(config.strides):
        raise ValueError(f"params have {len(p['convs'])} conv blocks, config has {len(config.strides)}")
    if config.frames(audio.shape[2]) < 1:
        raise ValueError(f"audio of {audio.shape[2]} samples is too short for one frame (hop {config.hop})")
    h = audio
    for conv, k, s in zip(p["convs"], config.kernel_sizes, config.strides):
        h = F.gelu(conv1d(conv, h, stride=s, padding=(k - s) // 2))
    z = linear(p["proj"], h.transpose(1, 2))
    zq, indices, commitment = quantize(p["codebook"], z, exact_limit, n_candidates)
    return linear(p["out_proj"], zq), indices, commitment
