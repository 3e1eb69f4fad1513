"""Learning vs the update rule's knobs: trains a preset once per setting on the same batches.

    python -m benchmarks.update_thresholds [--preset tiny] [--steps N] [--settings 8:4,8:32,64:32:stochastic]
    python -m benchmarks.update_thresholds --twin [--steps N] [--settings ...]

A setting is ``flip_threshold:exp_threshold[:flip_mode[:seed]]`` (mode "counter" unless given); a flip
threshold ``a..b`` (stochastic mode) anneals θ geometrically from a to b over the run's steps. By default it
prints one row per setting of the whole preset: first and final next-byte loss, the worst total loss (all
objective terms) over the run, held-out bits/byte, and the flips over the run. With ``--twin`` it runs
:func:`arbfn.compare.compare` (byte path against the float twin) and prints held-out bits/byte of both, their
ratio and the ternary state's bytes/weight (on CPU, as arbfn compare). The whole-preset runs use CPU or GPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from arbfn import data
from arbfn.compare import compare
from arbfn.config import Config, UpdateConfig, preset
from arbfn.model import init_model
from arbfn.ternary import to_device
from arbfn.train import train


def parse_setting(text: str, steps: int) -> UpdateConfig:
    """``"flip:exp[:mode[:seed]]"`` as an UpdateConfig; a flip of ``"a..b"`` anneals θ from a to b over ``steps``."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"a setting is flip:exp[:mode[:seed]], got {text!r}")
    mode = parts[2] if len(parts) > 2 else "counter"
    seed = int(parts[3]) if len(parts) > 3 else 0
    flip, _, final = parts[0].partition("..")
    anneal = dict(flip_threshold_final=int(final), anneal_steps=steps) if final else {}
    return UpdateConfig(int(flip), int(parts[1]), mode, seed, **anneal)


def flip_label(u: UpdateConfig) -> str:
    """θ, or "θ0→θ1" for an annealed one."""
    return f"{u.flip_threshold}→{u.flip_threshold_final}" if u.flip_threshold_final else str(u.flip_threshold)


def configure(name: str, update: UpdateConfig, steps: int) -> Config:
    """Preset ``name`` with ``update`` and ``steps``."""
    cfg = preset(name)
    return dataclasses.replace(cfg, update=update, train=dataclasses.replace(cfg.train, steps=steps))


def run(cfg: Config, device: str) -> dict[str, float]:
    """One training run of the whole model; summary figures."""
    state = to_device(init_model(cfg, torch.Generator().manual_seed(cfg.train.seed)), device)  # laid out by cfg
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
    p.add_argument("--twin", action="store_true", help="byte path against the float twin (arbfn.compare)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    updates = [parse_setting(s, a.steps) for s in a.settings.split(",")]
    print(f"{a.preset} preset{' byte path vs float twin' if a.twin else ''}, {a.steps} steps, device {a.device}")
    if a.twin:
        print("| flip mode | flip θ | exp θ | seed | bpb ternary | bpb float | ratio | bytes/weight |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| flip mode | flip θ | exp θ | byte loss step 1 | byte loss (last 5 mean) | worst total loss "
              "| held-out bits/byte | flips |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for u in updates:
        cfg = configure(a.preset, u, a.steps)
        head = f"| {u.flip_mode} | {flip_label(u)} | {u.exp_threshold} |"
        if a.twin:
            r = compare(cfg, data.load_corpus())
            print(f"{head} {u.seed} | {r['bpb_ternary']:.4f} | {r['bpb_float']:.4f} | {r['ratio']:.3f} "
                  f"| {r['bytes_per_weight']:.3f} |", flush=True)
        else:
            r = run(cfg, a.device)
            print(f"{head} {r['first']:.3f} | {r['final']:.3f} | {r['worst']:.3f} | {r['held_out_bpb']:.3f} "
                  f"| {int(r['flips']):,} |", flush=True)


if __name__ == "__main__":
    main()
