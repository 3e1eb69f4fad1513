"""The full multimodal train step (text + image + audio + video latents through VQ, graph, memory, MoE, heads)
with int8 sidecars: audit, then the median time of the sidecar encoding and of the ternary train step.

    python -m benchmarks.multimodal_step [--device cuda] [--steps 10] [--batch-size 2] [--sidecar-dir DIR]

Without --sidecar-dir it builds the tiny random sidecars (sidecars/tiny.py) in a temporary folder: 32 px
images (16 patches -> 14 image positions), 4000 audio samples (9 frames), 64 px frames. With --sidecar-dir
it loads the real ones: 224 px images (254 positions), 14,400 samples (0.9 s, 36 frames), 256 px frames.
The first step (allocation, autotuning) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

import sidecars
from arbfn import data
from arbfn.audit import audit, format_audit
from arbfn.config import preset
from arbfn.model import init_model
from arbfn.multimodal import featurize, multimodal_config
from arbfn.ternary import to_device
from arbfn.train import train_step
from benchmarks._timing import device_sync
from sidecars.tiny import TINY_FRAME_SIZE, TINY_IMAGE_SIZE, save_tiny_sidecars

TINY_SIZES = {"image_size": TINY_IMAGE_SIZE, "samples": 4000, "frame_size": TINY_FRAME_SIZE}
REAL_SIZES = {"image_size": sidecars.vision.IMAGE_SIZE, "samples": 14_400, "frame_size": 256}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall time in ms, the device synchronised before and after."""
    device_sync(device)
    t0 = time.perf_counter()
    out = fn()
    device_sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def raw_batch(batch_size: int, seq_len: int, sizes: dict[str, int], device: torch.device, seed: int) -> dict:
    """Random media and targets of one multimodal batch, on ``device`` (the sidecars encode the raw keys)."""
    g = torch.Generator().manual_seed(seed)
    b, s = batch_size, sizes
    batch = {"bytes": data.sample_batch(data.load_corpus(), b, seq_len, g),
             "image_pixels": torch.rand(b, 3, s["image_size"], s["image_size"], generator=g),
             "audio_waveform": 0.1 * torch.randn(b, s["samples"], generator=g),
             "video_frames": torch.rand(b, 3, s["frame_size"], s["frame_size"], generator=g),
             "video_noise": torch.randn(b, 16, 1, 32, 32, generator=g),
             "video_step": torch.randint(0, 4, (b,), generator=g),  # every preset has >= 4 denoise steps
             "audio_tokens": torch.randint(0, 289, (b, seq_len), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def run(args: argparse.Namespace, sidecar_dir: str) -> None:
    """Load the sidecars, audit, and time ``args.steps`` multimodal train steps."""
    device = torch.device(args.device)
    sizes = REAL_SIZES if args.sidecar_dir else TINY_SIZES
    loaded = sidecars.load_sidecars(sidecar_dir, sidecars.SIDECARS, args.quantize, device, sizes["image_size"])
    cfg = multimodal_config(preset(args.preset), loaded)
    state = to_device(init_model(cfg, torch.Generator().manual_seed(0)), device)
    print(format_audit(audit(state, strict=args.quantize == "int8", sidecars=loaded)))
    encode_ms, step_ms, losses = [], [], []
    for i in range(args.steps + 1):
        batch, t_enc = timed(lambda: featurize(raw_batch(args.batch_size, args.seq_len, sizes, device, i), loaded),
                             device)
        (state, metrics), t_step = timed(lambda: train_step(state, batch, cfg), device)
        losses.append(float(metrics["loss"]))
        if i:
            encode_ms.append(t_enc)
            step_ms.append(t_step)
    shapes = {k: tuple(v.shape) for k, v in batch.items() if k.endswith(("features", "latent"))}
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"preset {cfg.name}, batch {args.batch_size} x {args.seq_len} bytes, images {sizes['image_size']} px, "
          f"audio {sizes['samples']} samples, frames {sizes['frame_size']} px, sidecars {args.quantize}")
    print(f"features {shapes}")
    print(f"median over {args.steps} steps: sidecar encoding {statistics.median(encode_ms):.1f} ms, "
          f"train step {statistics.median(step_ms):.1f} ms; loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def main() -> None:
    """Parse arguments; build tiny sidecars in a temporary folder unless --sidecar-dir names real ones."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sidecar-dir", help="real sidecars (dinov2-small/, moonshine-base/, pig-vae/); default: tiny ones")
    p.add_argument("--quantize", default="int8", choices=("int8", "none"))
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.quantize = None if args.quantize == "none" else args.quantize
    if args.sidecar_dir:
        run(args, args.sidecar_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, str(save_tiny_sidecars(tmp)))


if __name__ == "__main__":
    main()
