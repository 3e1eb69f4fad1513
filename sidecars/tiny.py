"""Tiny randomly initialised sidecars from the real config classes, saved like the real ones (tests, benchmarks).

:func:`save_tiny_sidecars` writes ``dinov2-small`` (32 px images, 8 px patches: 16 patches of width 32),
``moonshine-base`` (width 32, one encoder and one decoder layer) and ``pig-vae`` (an AutoencoderKL with 16
latent channels and 2x downsampling: 64 px frames give the VideoHead's 32x32 latents) under one folder, in
the ``save_pretrained`` layout the loaders read. Load the vision one with ``image_size=TINY_IMAGE_SIZE``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sidecars import sidecar_folders

TINY_IMAGE_SIZE = 32
TINY_FRAME_SIZE = 64


def save_tiny_sidecars(sidecar_dir: str | Path, seed: int = 0) -> Path:
    """Write the three tiny sidecars under ``sidecar_dir`` (float weights); returns ``sidecar_dir``."""
    folders = sidecar_folders(sidecar_dir)
    with torch.random.fork_rng(devices=[]):  # the models' initialisers draw from the global generator
        torch.manual_seed(seed)
        _save(folders)
    return Path(sidecar_dir)


def _save(folders: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model, MoonshineConfig, MoonshineModel

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=TINY_IMAGE_SIZE, patch_size=8)).save_pretrained(folders["image"])
    heads = dict(encoder_num_attention_heads=2, decoder_num_attention_heads=2, encoder_num_key_value_heads=2,
                 decoder_num_key_value_heads=2)
    MoonshineModel(MoonshineConfig(vocab_size=64, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=1,
                                   decoder_num_hidden_layers=1, max_position_embeddings=256, **heads)
                   ).save_pretrained(folders["audio"])
    blocks = ("DownEncoderBlock2D", "DownEncoderBlock2D"), ("UpDecoderBlock2D", "UpDecoderBlock2D")
    AutoencoderKL(down_block_types=blocks[0], up_block_types=blocks[1], block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=16, norm_num_groups=4, sample_size=TINY_FRAME_SIZE).save_pretrained(folders["video"])
