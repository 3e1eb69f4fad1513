"""Frozen imported encoders (sidecars): DINOv2-small for images, Moonshine-base for audio, a diffusers VAE
for video frames. Each loads from a local folder only, is int8-quantized with optimum-quanto and frozen,
and turns raw pixels or audio into features; the ternary sequencers that consume those are arbfn layers.

Imports torch, transformers, diffusers and optimum-quanto only (never arbfn or kernels). Folders follow
SYSTEM.md: ``<sidecar_dir>/dinov2-small``, ``<sidecar_dir>/moonshine-base``, ``<sidecar_dir>/pig-vae``;
the default ``sidecar_dir`` is ``$ARBFN_SIDECAR_DIR``, else ``~/.cache/arbfn/sidecars``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sidecars import audio, vae, vision
from sidecars.audio import audio_frames, encode_audio, load_audio
from sidecars.quantize import load_frozen, sidecar_report
from sidecars.vae import encode_frames, load_vae
from sidecars.vision import encode_image, load_vision, vision_patches

SIDECARS = ("image", "audio", "video")  # the modality each sidecar encodes


def default_sidecar_dir() -> Path:
    """``$ARBFN_SIDECAR_DIR`` if set, else ``~/.cache/arbfn/sidecars``."""
    return Path(os.environ.get("ARBFN_SIDECAR_DIR", "~/.cache/arbfn/sidecars")).expanduser()


def sidecar_folders(sidecar_dir: str | Path) -> dict[str, Path]:
    """Where each sidecar lives under ``sidecar_dir``."""
    root = Path(sidecar_dir).expanduser()
    return {"image": root / vision.FOLDER, "audio": root / audio.FOLDER, "video": root / vae.FOLDER}


def load_sidecars(sidecar_dir: str | Path, names: tuple[str, ...] = ("image", "audio"),
                  quantize_weights: str | None = "int8", device: torch.device | str | None = None,
                  image_size: int = vision.IMAGE_SIZE) -> dict[str, nn.Module]:
    """The named sidecars (of :data:`SIDECARS`) loaded frozen from their folders under ``sidecar_dir``."""
    unknown = sorted(set(names) - set(SIDECARS))
    if unknown:
        raise ValueError(f"unknown sidecars {unknown}; known: {', '.join(SIDECARS)}")
    folders = sidecar_folders(sidecar_dir)
    loaders = {"image": lambda f: load_vision(f, quantize_weights, device, image_size),
               "audio": lambda f: load_audio(f, quantize_weights, device),
               "video": lambda f: load_vae(f, quantize_weights, device)}
    return {n: loaders[n](folders[n]) for n in SIDECARS if n in names}


__all__ = ["SIDECARS", "audio_frames", "default_sidecar_dir", "encode_audio", "encode_frames", "encode_image",
           "load_audio", "load_frozen", "load_sidecars", "load_vae", "load_vision", "sidecar_folders",
           "sidecar_report", "vision_patches"]
