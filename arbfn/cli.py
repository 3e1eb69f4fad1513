"""``arbfn train | generate | audit | export | compare``: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from arbfn.config import COMPUTE_DTYPES, FLIP_MODES
from kernels.update import ANNEAL_SHAPES


def _device(name: str) -> torch.device:
    """``--device`` as a torch device: auto (the GPU if there is one), cpu, cuda or cuda:N; ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    return torch.device(name)


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The parsed train options as command-line arguments again, for the ranks torchrun starts. Not --nproc: a
    rank reads its world from the environment, and torchrun's parser would take --nproc for its --nproc-per-node."""
    argv = ["train"]
    for name, value in vars(args).items():
        if name not in ("command", "fn", "nproc") and value is not None and value is not False:
            argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


STEP_KINDS = ("eager", "compiled", "cuda-graph")


def _single_process_step(kind: str | None, cfg, state, device: torch.device):
    """(cfg, state, step_fn) for ``arbfn train --step``: the eager step, the compiled one, or the compiled one
    replayed as a CUDA graph. The last two need fixed shapes, so an MoE takes its dense dispatch for the whole
    batch (``moe.dense_limit`` raised to the batch's tokens: the same result, SYSTEM.md "MoE")."""
    from arbfn.compiled import CompiledTrainStep, with_dense_moe
    from arbfn.graphed import GraphedTrainStep
    from arbfn.model import State
    from arbfn.train import train_step

    if kind in (None, "eager"):
        return cfg, state, train_step
    if kind == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"--step cuda-graph needs a CUDA device, got {device}")
    cfg = with_dense_moe(cfg, cfg.train.batch_size * cfg.train.context)
    state = State(state.params, state.step, cfg.model)
    step = CompiledTrainStep(cfg) if kind == "compiled" else GraphedTrainStep(cfg)
    return cfg, state, lambda s, batch, _cfg: step(s, batch)


def _with_update_flags(cfg, args: argparse.Namespace, resuming: bool):
    """``cfg`` with the update knobs given on the command line (--flip-mode, --counter-bits, --flip-threshold,
    --exp-threshold, --flip-threshold-final, --anneal-steps, --anneal-shape, --chain-scale, --chain-power) and
    --group-size. A resumed checkpoint keeps its flip mode, counter width and group size: its state layout belongs
    to them. --flip-threshold-final without --anneal-steps anneals over the run's steps (--steps, else the preset's;
    a resumed run must say where the schedule ends)."""
    knobs = ("flip_mode", "counter_bits", "flip_threshold", "exp_threshold", "flip_threshold_final", "anneal_steps",
             "anneal_shape", "chain_scale", "chain_power", "fixed_norm_gains")
    given = {k: v for k, v in vars(args).items() if k in knobs and v is not None}
    if "flip_threshold_final" in given and "anneal_steps" not in given:
        if resuming:  # the schedule counts the state's steps from its first, not this invocation's
            raise ValueError("--flip-threshold-final on a resumed run needs --anneal-steps: the step (counted from "
                             "the run's first) at which θ reaches it")
        given["anneal_steps"] = args.steps or cfg.train.steps
    for name in ("flip_mode", "counter_bits", "fixed_norm_gains"):
        if resuming and name in given and given[name] != getattr(cfg.update, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {given[name]} differs from the checkpoint's {getattr(cfg.update, name)!r}: "
                             "its state layout (flip counters or none, their width, the norm gains' accumulators) "
                             "belongs to it")
    group_size = args.group_size
    if group_size is not None and group_size != cfg.model.group_size:
        if resuming:
            raise ValueError(f"--group-size {group_size} differs from the checkpoint's {cfg.model.group_size}: its "
                             "exponents are laid out per group")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, group_size=group_size))
    return dataclasses.replace(cfg, update=dataclasses.replace(cfg.update, **given))


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset (or --resume a checkpoint) on a corpus; write checkpoint, metrics.jsonl and loss.png into
    --out. With --nproc N > 1, relaunch as N ranks through torchrun; a rank (torchrun's environment) trains
    data-parallel and only rank 0 writes."""
    import os

    from tqdm import tqdm

    from arbfn import checkpoint, data, distributed
    from arbfn.config import preset
    from arbfn.model import init_model
    from arbfn.report import plot_loss
    from arbfn.ternary import to_device
    from arbfn.train import train

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    ranked = distributed.launched()
    world = int(os.environ["WORLD_SIZE"]) if ranked else args.nproc or 1
    if args.nproc is not None and args.nproc != world:
        raise ValueError(f"--nproc {args.nproc} disagrees with the launcher's WORLD_SIZE {world}")
    state, cfg = checkpoint.load_run(args.resume) if args.resume else (None, preset(args.preset))
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("batch_size", args.batch_size),
                                   ("compute_dtype", args.compute_dtype)) if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    cfg = _with_update_flags(cfg, args, resuming=state is not None)
    distributed.check_batch_size(cfg.train.batch_size, world)
    if world > 1 or ranked:
        distributed.check_update(cfg.update, args.exchange)
    if world > 1 and args.step not in (None, "eager"):
        raise ValueError(f"--step {args.step} is for one process; data-parallel ranks run the eager step")
    if world > 1 and not ranked:
        return distributed.relaunch("arbfn.cli", _train_argv(args), world)
    device = distributed.init(args.device, args.timeout) if ranked else _device(args.device)
    try:
        lead = distributed.rank() == 0
        out = Path(args.out or f"runs/{cfg.name}")
        corpus = data.load_corpus(args.corpus)
        if state is None:
            state = init_model(cfg, torch.Generator().manual_seed(cfg.train.seed))
        state = to_device(state, device)
        if not ranked:
            cfg, state, step_fn = _single_process_step(args.step, cfg, state, device)
        bar = tqdm(total=cfg.train.steps, desc=f"train {cfg.name}", unit="step", disable=args.quiet or not lead)

        def on_step(i: int, row: dict[str, float]) -> None:
            bar.set_postfix(loss=f"{row['byte_loss']:.3f}", bytes_per_s=f"{row['bytes_per_s']:,.0f}",
                            flips=int(row["flips"]))
            bar.update(1)

        if ranked:
            state, history = distributed.train_data_parallel(cfg, state, corpus, out, on_step, args.exchange)
        else:
            state, history = train(cfg, state, corpus, out, on_step, step_fn)
        bar.close()
        ckpt = (distributed.save_checkpoint if ranked else checkpoint.save)(state, out / "checkpoint.safetensors", cfg)
    finally:
        distributed.shutdown()
    if not lead:
        return 0
    plot_loss(history, out / "loss.png", f"arbfn {cfg.name}: ternary sign-vote training")
    if history:
        first, last = history[0]["byte_loss"], history[-1]["byte_loss"]
        print(f"next-byte loss {first:.3f} -> {last:.3f} nats over {len(history)} steps; "
              f"held-out {history[-1].get('held_out_bpb', float('nan')):.3f} bits/byte"
              + (f" ({world} ranks)" if ranked else ""))
    print(f"wrote {ckpt}, {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample bytes from a checkpoint, or from an AOT-compiled package (--compiled: a fixed window of its seq_len)."""
    from arbfn import checkpoint
    from arbfn.generate import generate, generate_compiled

    if args.compiled:
        if args.window is not None:
            raise ValueError("--window is fixed by the compiled package (its seq_len); drop --window")
        print(generate_compiled(args.compiled, args.prompt, args.max_bytes, args.temperature, args.seed))
        return 0
    state = checkpoint.load(args.checkpoint, _device(args.device))
    print(generate(state, args.prompt, args.max_bytes, args.temperature, args.seed, args.window))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """AOT-compile a checkpoint's forward for ids of shape [--batch-size, --seq-len] into a .pt2 package."""
    from arbfn import checkpoint
    from arbfn.export import export_model

    state = checkpoint.load(args.checkpoint, _device(args.device))
    print(f"wrote {export_model(state, args.batch_size, args.seq_len, args.out)}")
    return 0


def _audit_sidecars(args: argparse.Namespace, cfg):
    """(the sidecars --image/--audio/--vae ask for, loaded int8 from --sidecar-dir, checked against ``cfg``;
    ``cfg``, given the image/audio sequencers they feed unless it comes from a checkpoint)."""
    names = tuple(n for n, on in (("image", args.image), ("audio", args.audio), ("video", args.vae)) if on)
    if not names:
        return {}, cfg
    import sidecars
    from arbfn.multimodal import check_sidecars, multimodal_config

    loaded = sidecars.load_sidecars(args.sidecar_dir or sidecars.default_sidecar_dir(), names)
    cfg = cfg if args.checkpoint else multimodal_config(cfg, loaded)
    check_sidecars(cfg.model, loaded)
    return loaded, cfg


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a preset (shape-only, nothing allocated) or a checkpoint, and the sidecars --image/--audio/--vae
    load from --sidecar-dir; a preset gets the image/audio sequencers sized by the loaded sidecars."""
    from arbfn import checkpoint
    from arbfn.audit import audit, format_audit
    from arbfn.config import preset
    from arbfn.model import init_model

    if args.checkpoint:
        state, cfg = checkpoint.load_run(args.checkpoint)
        if args.preset and args.preset != cfg.name:
            print(f"note: checkpoint holds preset {cfg.name!r}, auditing that", file=sys.stderr)
        loaded, cfg = _audit_sidecars(args, cfg)
    else:
        loaded, cfg = _audit_sidecars(args, preset(args.preset or "tiny"))
        state = init_model(cfg)
    report = audit(state, strict=args.strict, sidecars=loaded)
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train a preset's byte path ternary and as a float twin; table, compare.png and compare.json in --out."""
    from arbfn import data
    from arbfn.compare import compare, format_table, write_outputs
    from arbfn.config import preset

    cfg = _with_update_flags(preset(args.preset), args, resuming=False)
    if args.compute_dtype is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compute_dtype=args.compute_dtype))
    on_eval = None if args.json else lambda s, t, f: print(f"step {s}: ternary {t:.4f}  float {f:.4f} bits/byte",
                                                            file=sys.stderr)
    result = compare(cfg, data.load_corpus(args.corpus), args.steps, args.eval_every, args.lr, on_eval=on_eval,
                     device=_device(args.device))
    png, js = write_outputs(result, Path(args.out or f"runs/compare-{cfg.name}"))
    print(json.dumps(result, indent=2) if args.json else f"{format_table(result)}\nwrote {png}, {js}")
    return 0


def _add_update_flags(p: argparse.ArgumentParser) -> None:
    """--flip-mode, --counter-bits, --flip-threshold, --exp-threshold, the drawn flips' θ schedule, the chain's knobs
    (UpdateConfig's) and --group-size (ModelConfig's) on a subcommand."""
    p.add_argument("--flip-mode", choices=FLIP_MODES,
                   help="trit flips from int8 vote counters (default), counter-free hashed coin flips (0.27 B/weight), "
                        "or a chain: one place bit per weight beside its trit, fixed exponents (0.34 B/weight at "
                        "--group-size 64; recommended: --fixed-norm-gains --flip-threshold 1 --flip-threshold-final "
                        "128 --anneal-shape cosine)")
    p.add_argument("--counter-bits", type=int, choices=(8, 4),
                   help="flip-counter width: int8 (default, 1 B/weight) or 4-bit nibbles, two per byte (0.5 B/weight; "
                        "needs --flip-threshold <= 7)")
    p.add_argument("--flip-threshold", type=int,
                   help="net votes per trit move (default: the preset's, 16; stochastic flips: 1/θ per vote, θ up to "
                        "2**24)")
    p.add_argument("--flip-threshold-final", type=int,
                   help="stochastic flips: anneal θ geometrically from --flip-threshold to this (default: constant "
                        "θ)")
    p.add_argument("--anneal-steps", type=int,
                   help="steps over which θ anneals to --flip-threshold-final (default: the run's --steps)")
    p.add_argument("--anneal-shape", choices=ANNEAL_SHAPES,
                   help="how θ anneals: geometric (default), or cosine (the move rate 1/θ on a half cosine)")
    p.add_argument("--chain-scale", type=float,
                   help="chain flips: a vote moves with probability min(1, |g| / (scale * group rms)) ** power / θ "
                        "(default 2)")
    p.add_argument("--chain-power", type=float, help="chain flips: the power of that ratio (default 3)")
    p.add_argument("--fixed-norm-gains", action="store_true", default=None,
                   help="keep the RMSNorm gains at their init, with no accumulator (any flip mode; every chain figure "
                        "used it, and it helps counter-free flips)")
    p.add_argument("--group-size", type=int,
                   help="inputs per exponent group (default: the preset's; a fresh model only: a checkpoint keeps its)")
    p.add_argument("--exp-threshold", type=int,
                   help="net votes per group exponent move (default: the preset's, 127; 1..127)")


def _add_compute_dtype_flag(p: argparse.ArgumentParser) -> None:
    """--compute-dtype (TrainConfig.compute_dtype) on a subcommand that trains."""
    p.add_argument("--compute-dtype", choices=tuple(COMPUTE_DTYPES),
                   help="dtype of the ternary forward's activations while training (default float32; weights are "
                        "exact in either, logits and loss stay fp32)")


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
    _add_update_flags(t)
    _add_compute_dtype_flag(t)
    t.add_argument("--step", choices=STEP_KINDS,
                   help="how each train step runs: eager (default), compiled (torch.compile, fixed-step halting loops), "
                        "or cuda-graph (compiled, then replayed as one CUDA graph: no per-op host overhead)")
    t.add_argument("--resume", help="continue training this checkpoint (its preset and config; --preset is ignored)")
    t.add_argument("--nproc", type=int, help="data-parallel ranks on this host, launched through torchrun")
    t.add_argument("--exchange", default="trits", choices=("trits", "int8", "fp32"),
                   help="how ranks exchange gradient votes: packed trits (default, ~20x fewer bytes than fp32), int8, "
                        "or the fp32 gradients themselves (what chain flips need)")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits for its peers before failing")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample bytes from a checkpoint or a compiled package")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--compiled", help="a .pt2 package from `arbfn export` (batch size 1)")
    g.add_argument("--window", type=int, help="feed exactly this many ids per step, left-padded (as --compiled does)")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-bytes", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("export", help="AOT-compile a checkpoint's forward (AOTInductor .pt2, fixed input shape)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="the .pt2 package to write")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--seq-len", type=int, default=64)
    e.add_argument("--device", default="cpu", help="cpu or cuda: the device the package runs on")
    e.set_defaults(fn=cmd_export)

    a = sub.add_parser("audit", help="count ternary weights, state bytes and float tensors")
    a.add_argument("--preset")
    a.add_argument("--checkpoint")
    a.add_argument("--json", action="store_true")
    a.add_argument("--strict", action="store_true",
                   help="fail on any float tensor in the core state, a trainable sidecar param or a sidecar not int8")
    a.add_argument("--image", action="store_true", help="add the DINOv2 sidecar and the image sequencer")
    a.add_argument("--audio", action="store_true", help="add the Moonshine sidecar and the audio sequencer")
    a.add_argument("--vae", action="store_true", help="add the VAE sidecar (video frames -> VideoHead latents)")
    a.add_argument("--sidecar-dir", help="folder holding dinov2-small/, moonshine-base/, pig-vae/ "
                                         "(default $ARBFN_SIDECAR_DIR or ~/.cache/arbfn/sidecars)")
    a.set_defaults(fn=cmd_audit)

    c = sub.add_parser("compare", help="ternary training vs its float twin (byte path): held-out bits/byte")
    c.add_argument("--preset", default="tiny")
    c.add_argument("--steps", type=int, help="training steps for both (default: the preset's)")
    c.add_argument("--eval-every", type=int, default=20, help="held-out evaluation period in steps")
    c.add_argument("--lr", type=float, default=3e-3, help="the float twin's AdamW learning rate")
    c.add_argument("--out", help="output folder (default runs/compare-<preset>)")
    c.add_argument("--corpus", help="a text file instead of the embedded default")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.add_argument("--device", default="cpu", help="cpu (default), cuda or auto: where both sides train")
    _add_update_flags(c)
    _add_compute_dtype_flag(c)
    c.set_defaults(fn=cmd_compare)
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
