"""Learning vs the update rule's thresholds: trains a preset once per setting on the same batches.

    python -m benchmarks.update_thresholds [--preset tiny] [--steps N] [--settings 8:4,8:32,16:32]

Prints one row per (flip_threshold, exp_threshold): first and final next-byte loss, the worst total loss
(all objective terms) over the run, held-out bits/byte, and the flips over the run. Runs on CPU or GPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from arbfn import data
from arbfn.config import UpdateConfig, preset
from arbfn.model import init_model
from arbfn.ternary import to_device
from arbfn.train import train


def run(name: str, flip: int, exp: int, steps: int, device: str) -> dict[str, float]:
    """One training run of preset ``name`` with the given thresholds; summary figures."""
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, update=UpdateConfig(flip, exp), train=dataclasses.replace(cfg.train, steps=steps))
    state = to_device(init_model(cfg, torch.Generator().manual_seed(cfg.train.seed)), device)
    _, hist = train(cfg, state, data.load_corpus())
    return {"first": hist[0]["byte_loss"], "final": sum(h["byte_loss"] for h in hist[-5:]) / 5,
            "worst": max(h["loss"] for h in hist), "held_out_bpb": hist[-1]["held_out_bpb"],
            "flips": sum(h["flips"] for h in hist)}


def main() -> None:
    """Parse arguments, run every setting, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--settings", default="8:4,8:32,16:32,32:32")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    print(f"{a.preset} preset, {a.steps} steps, device {a.device}")
    print("| flip θ | exp θ | byte loss step 1 | byte loss (last 5 mean) | worst total loss | held-out bits/byte | flips |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in a.settings.split(","):
        f, e = (int(x) for x in s.split(":"))
        r = run(a.preset, f, e, a.steps, a.device)
        print(f"| {f} | {e} | {r['first']:.3f} | {r['final']:.3f} | {r['worst']:.3f} | {r['held_out_bpb']:.3f} | {int(r['flips']):,} |")


if __name__ == "__main__":
    main()
