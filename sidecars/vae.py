"""The VAE sidecar ("pig-vae"): a frozen int8 diffusers VAE turning video frames into VideoHead latents.

Expects ``<sidecar_dir>/pig-vae`` to hold a diffusers VAE's ``save_pretrained`` files (config.json,
diffusion_pytorch_model.safetensors); the class comes from its config (``diffusers.AutoModel``). One frame
[B, 3, H, W] in [0, 1] encodes to the scaled latent mean [B, C, 1, H/f, W/f]: the (B, 16, 1, 32, 32) of
the VideoHead for a 16-channel VAE with f = 8 at 256 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sidecars.quantize import load_frozen, require_folder
from sidecars.vision import check_rgb

FOLDER = "pig-vae"


def _vae(path: Path) -> nn.Module:
    from diffusers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True)


def load_vae(folder: str | Path, quantize_weights: str | None = "int8",
             device: torch.device | str | None = None) -> nn.Module:
    """A frozen (int8 by default) diffusers VAE from a local folder."""
    path = require_folder(folder, "a diffusers VAE (pig-vae)",
                          f"vae.save_pretrained('{folder}') of the diffusers VAE on a networked machine")
    return load_frozen(lambda: _vae(path), quantize_weights, device)


@torch.no_grad()
def encode_frames(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """RGB frames [B, 3, H, W] in [0, 1] -> latents [B, C, 1, H/f, W/f]: ``(mode - shift) * scaling`` (fp32)."""
    check_rgb(frames, "frames")
    weight = next(model.parameters())
    z = model.encode((frames * 2 - 1).to(weight.device, weight.dtype)).latent_dist.mode().float()
    shift = getattr(model.config, "shift_factor", None) or 0.0
    return ((z - shift) * model.config.scaling_factor).unsqueeze(2)
