"""ImageSequencer and AudioSequencer: frozen sidecar features -> ternary projection -> model width.

Both are a *valid* window of width ``window`` over the feature positions, concatenated and projected by one
ternary linear [d_model, window * d_feature]: F positions give F - window + 1. The image sequencer uses
width 3 over DINOv2 patch tokens (256 patches at 224 px -> 254 positions, the original's (1, 254, 512)); the
audio sequencer projects each Moonshine frame (width 1). Features are RMS-normalised first (parameter
free): the sidecars' output scale is not the unit scale the fan-in scaled ternary init assumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arbfn.ternary import TernaryWeight, init_ternary, linear


def init_sequencer(d_feature: int, window: int, d_model: int, group_size: int,
                   generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """{"proj": [d_model, window * d_feature]}."""
    if min(d_feature, window, d_model) < 1:
        raise ValueError(f"sequencer sizes must be positive, got d_feature={d_feature}, window={window}, "
                         f"d_model={d_model}")
    return {"proj": init_ternary(d_model, window * d_feature, group_size, generator)}


def sequencer(p: dict[str, TernaryWeight], features: torch.Tensor, window: int) -> torch.Tensor:
    """features [B, F, d_feature] -> [B, F - window + 1, d_model]."""
    d_feature = p["proj"].in_features // window
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"features must be a float tensor, got {getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() != 3 or features.shape[2] != d_feature or features.shape[1] < window:
        raise ValueError(f"features must be [B, F >= {window}, {d_feature}], got shape {tuple(features.shape)}")
    x = F.rms_norm(features, (d_feature,))
    n = x.shape[1] - window + 1
    return linear(p["proj"], torch.cat([x[:, i:i + n] for i in range(window)], dim=-1))


def init_image_sequencer(d_feature: int, d_model: int, group_size: int, generator: torch.Generator | None,
                         window: int = 3) -> dict[str, TernaryWeight]:
    """ImageSequencer params: a width-``window`` patch projection to ``d_model``."""
    return init_sequencer(d_feature, window, d_model, group_size, generator)


def image_sequencer(p: dict[str, TernaryWeight], patches: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Patch features [B, P, d_feature] -> [B, P - window + 1, d_model]."""
    return sequencer(p, patches, window)


def init_audio_sequencer(d_feature: int, d_model: int, group_size: int, generator: torch.Generator | None,
                         window: int = 1) -> dict[str, TernaryWeight]:
    """AudioSequencer params: a per-frame (width-``window``) projection to ``d_model``."""
    return init_sequencer(d_feature, window, d_model, group_size, generator)


def audio_sequencer(p: dict[str, TernaryWeight], frames: torch.Tensor, window: int = 1) -> torch.Tensor:
    """Frame features [B, F, d_feature] -> [B, F - window + 1, d_model]."""
    return sequencer(p, frames, window)
