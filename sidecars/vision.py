"""The vision sidecar: a frozen int8 DINOv2-small that turns pixels into patch features.

Expects ``<sidecar_dir>/dinov2-small`` to hold the transformers ``save_pretrained`` files of
``facebook/dinov2-small`` (config.json, model.safetensors). Images are resized to ``image_size`` (224 by
default: 16x16 = 256 patches of 14 px) and normalised with the ImageNet mean/std (what its image processor
does, without the 256 px resize + centre crop); the features are the last hidden states of the patch
tokens, CLS dropped: [B, (image_size // patch_size)**2, hidden_size] ([B, 256, 384] for DINOv2-small).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sidecars.quantize import load_frozen, require_folder

FOLDER = "dinov2-small"
MODEL_ID = "facebook/dinov2-small"
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_vision(folder: str | Path, quantize_weights: str | None = "int8", device: torch.device | str | None = None,
                image_size: int = IMAGE_SIZE) -> nn.Module:
    """A frozen (int8 by default) ``Dinov2Model`` from a local folder; ``image_size`` is stored on it."""
    from transformers import Dinov2Model

    path = require_folder(folder, f"the save_pretrained files of {MODEL_ID}",
                          f"Dinov2Model.from_pretrained('{MODEL_ID}').save_pretrained('{folder}') "
                          "on a networked machine")
    model = load_frozen(lambda: Dinov2Model.from_pretrained(path, local_files_only=True), quantize_weights, device)
    patch = model.config.patch_size
    if image_size < patch or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    model._arb_image_size = image_size
    return model


def vision_patches(model: nn.Module) -> int:
    """Patch tokens per image at the model's image size (256 for DINOv2 at 224 px)."""
    return (model._arb_image_size // model.config.patch_size) ** 2


def check_rgb(x: torch.Tensor, name: str) -> None:
    """TypeError/ValueError unless ``x`` is a float RGB batch [B, 3, H, W]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(x.shape)}")


@torch.no_grad()
def encode_image(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """RGB pixels [B, 3, H, W] in [0, 1] -> patch features [B, vision_patches(model), hidden] (fp32, model's device)."""
    check_rgb(pixels, "pixels")
    size = model._arb_image_size
    weight = next(model.parameters())
    x = F.interpolate(pixels.to(weight.device, torch.float32), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    hidden = model(pixel_values=((x - mean) / std).to(weight.dtype)).last_hidden_state
    return hidden[:, 1:].float()
