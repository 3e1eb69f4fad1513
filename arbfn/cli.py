"""``arbfn train | generate | audit``: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset on a corpus; write checkpoint, metrics.jsonl and loss.png into --out."""
    from tqdm import tqdm

    from arbfn import checkpoint, data
    from arbfn.config import preset
    from arbfn.model import init_model
    from arbfn.report import plot_loss
    from arbfn.ternary import to_device
    from arbfn.train import train

    cfg = preset(args.preset)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("batch_size", args.batch_size))
                 if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    out = Path(args.out or f"runs/{cfg.name}")
    corpus = data.load_corpus(args.corpus)
    state = init_model(cfg, torch.Generator().manual_seed(cfg.train.seed))
    state = to_device(state, _device(args.device))
    bar = tqdm(total=cfg.train.steps, desc=f"train {cfg.name}", unit="step", disable=args.quiet)

    def on_step(i: int, row: dict[str, float]) -> None:
        bar.set_postfix(loss=f"{row['loss']:.3f}", bytes_per_s=f"{row['bytes_per_s']:,.0f}", flips=int(row["flips"]))
        bar.update(1)

    state, history = train(cfg, state, corpus, out, on_step)
    bar.close()
    ckpt = checkpoint.save(state, out / "checkpoint.safetensors", cfg)
    plot_loss(history, out / "loss.png", f"arbfn {cfg.name}: ternary sign-vote training")
    if history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(f"loss {first:.3f} -> {last:.3f} nats/byte over {len(history)} steps; "
              f"held-out {history[-1].get('held_out_bpb', float('nan')):.3f} bits/byte")
    print(f"wrote {ckpt}, {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample bytes from a checkpoint."""
    from arbfn import checkpoint
    from arbfn.generate import generate

    state = checkpoint.load(args.checkpoint, _device(args.device))
    print(generate(state, args.prompt, args.max_bytes, args.temperature, args.seed))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a preset (shape-only, nothing allocated) or a checkpoint."""
    from arbfn import checkpoint
    from arbfn.audit import audit, format_audit
    from arbfn.config import preset
    from arbfn.model import init_model

    if args.checkpoint:
        state, cfg = checkpoint.load_run(args.checkpoint)
        if args.preset and args.preset != cfg.name:
            print(f"note: checkpoint holds preset {cfg.name!r}, auditing that", file=sys.stderr)
    else:
        state = init_model(preset(args.preset or "tiny"))
    report = audit(state, strict=args.strict)
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="arbfn", description="True-ternary ARB network: train, sample, audit.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset on the embedded corpus (or --corpus FILE)")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--out", help="output folder (default runs/<preset>)")
    t.add_argument("--corpus", help="a text file to train on instead of the embedded default")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample bytes from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--max-bytes", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(fn=cmd_generate)

    a = sub.add_parser("audit", help="count ternary weights, state bytes and float tensors")
    a.add_argument("--preset")
    a.add_argument("--checkpoint")
    a.add_argument("--json", action="store_true")
    a.add_argument("--strict", action="store_true", help="fail on any float tensor in the core state")
    a.set_defaults(fn=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors in the user's input print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        print(f"arbfn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
