"""Train-step throughput, side by side in one run: the ternary step (forward, backward, sign-vote update,
counters) eager, compiled and (CUDA) compiled and replayed as one CUDA graph, for the whole preset and for its
byte path, against the float twin of the byte path (same architecture, nn.Linear + AdamW under bf16 autocast,
eager and under torch.compile), with peak device memory and the persistent state bytes per logical weight.
Each step is timed synced one by one (host work in front of the device's shows) and back to back with one sync
(as a loop that reads its metrics every few steps runs: host work overlaps the device work before it).

    python -m benchmarks.train_step [--device cuda] [--preset small] [--batch 16] [--context 256]
                                    [--matmul-precision highest|high] [--layouts stochastic,annealed,nibble,chain]
                                    [--compute-dtype float32|bfloat16] [--reps 8]
                                    [--kinds eager,compiled,"CUDA graph"]
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
from typing import Callable

import torch
from torch import nn

from arbfn.audit import audit
from arbfn.compare import byte_path_config
from arbfn.compiled import CompiledTrainStep, with_dense_moe
from arbfn.config import COMPUTE_DTYPES, Config, preset
from arbfn.graphed import GraphedTrainStep, capture
from arbfn.model import State, init_model
from arbfn.ternary import to_device
from arbfn.train import train_step
from arbfn.twin import FloatTwin, twin_loss
from benchmarks._timing import back_to_back_ms, describe, format_table, sync_ms


STEP_KINDS = ("eager", "compiled", "CUDA graph")


def runnable(kinds: tuple[str, ...], device: torch.device) -> list[str]:
    """The step kinds of ``kinds`` that run on ``device`` (a CUDA graph only on CUDA)."""
    return [k for k in kinds if k != "CUDA graph" or device.type == "cuda"]


def ternary_state(cfg: Config, device: torch.device) -> State:
    """A fresh state of ``cfg`` on ``device``."""
    s = init_model(cfg, torch.Generator().manual_seed(0))
    return State(to_device(s.params, device), s.step.to(device), s.config)


def measure(fn: Callable[[], object], device: torch.device, reps: int = 8) -> tuple[float, float, float]:
    """(median ms of ``reps`` steps with a sync after each, mean ms of ``reps`` steps back to back with one sync,
    peak device memory in MB during them; 0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = sync_ms(fn, device, warmup=2, reps=reps)
    back_to_back = back_to_back_ms(fn, device, reps)
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else 0.0
    return ms, back_to_back, peak


def ternary_rows(cfg: Config, label: str, ids: torch.Tensor, device: torch.device,
                 kinds: tuple[str, ...] = STEP_KINDS, reps: int = 8) -> list[list]:
    """Ternary step rows for ``cfg`` (eager, compiled, compiled in a CUDA graph: the last on CUDA only); the
    state advances across the timed steps."""
    box = {"state": ternary_state(cfg, device)}
    report = audit(box["state"])
    compiled = CompiledTrainStep(cfg)
    rows = []
    steps = {"eager": lambda s, b: train_step(s, b, cfg), "compiled": compiled,
             "CUDA graph": GraphedTrainStep(cfg, compiled)}
    for kind, step in ((k, steps[k]) for k in runnable(kinds, device)):
        def run() -> None:
            box["state"], _ = step(box["state"], ids)
        ms, back_to_back, peak = measure(run, device, reps)
        rows.append([f"ternary {label}, {kind}", ms, back_to_back, ids.numel() / ms * 1e3, peak, report["ternary_weights"],
                     f"{report['bytes_per_weight']:.3f}"])
    return rows


def twin_step(cfg: Config, ids: torch.Tensor, device: torch.device, kind: str
              ) -> tuple[Callable[[], None], nn.Module]:
    """(one float-twin AdamW step under bf16 autocast on ``ids``, the twin): ``kind`` is eager, compiled (the model
    under ``torch.compile``) or CUDA graph (that whole compiled step, AdamW included, captured: CUDA only)."""
    model = FloatTwin(cfg.model, torch.Generator().manual_seed(0)).to(device)
    forward = model if kind == "eager" else torch.compile(model)
    graphed = kind == "CUDA graph"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=device.type == "cuda", capturable=graphed)
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def run() -> None:
        opt.zero_grad(set_to_none=not graphed)  # a graph's gradients stay in its own buffers
        with autocast:
            loss = twin_loss(forward, ids)
        loss.backward()
        opt.step()

    return (capture(run)[0].replay if graphed else run), model


def twin_rows(cfg: Config, ids: torch.Tensor, device: torch.device, reps: int = 8,
              kinds: tuple[str, ...] = STEP_KINDS) -> list[list]:
    """The float twin's step (fp32 master weights: what a user would run) of each of ``kinds`` the device runs (no
    CUDA graph on CPU)."""
    rows = []
    for kind in runnable(kinds, device):
        run, model = twin_step(cfg, ids, device, kind)
        n = sum(p.numel() for p in model.parameters())
        state_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())  # weights + 2 Adam moments
        ms, back_to_back, peak = measure(run, device, reps)
        rows.append([f"float twin byte path, bf16 autocast + AdamW, {kind}", ms, back_to_back, ids.numel() / ms * 1e3, peak, n,
                     f"{state_bytes / n:.3f}"])
    return rows


LAYOUTS = {"stochastic": dict(flip_mode="stochastic"), "nibble": dict(counter_bits=4, flip_threshold=7),
           "annealed": dict(flip_mode="stochastic", flip_threshold=64, flip_threshold_final=2048, anneal_steps=1000),
           "chain": dict(flip_mode="chain", flip_threshold=1, flip_threshold_final=128, anneal_steps=1000,
                         anneal_shape="cosine", fixed_norm_gains=True)}


def with_layout(cfg: Config, layout: str) -> Config:
    """``cfg`` with the update rule's state layout ``layout`` (a key of ``LAYOUTS``)."""
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return dataclasses.replace(cfg, update=dataclasses.replace(cfg.update, **LAYOUTS[layout]))


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every train-step benchmark takes: device, preset, batch shape, matmul precision, compute dtype."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                    help="torch.set_float32_matmul_precision for the ternary step's fp32 matmuls ('high': TF32, "
                         "which holds every ternary weight exactly; the twin runs bf16 autocast either way)")
    ap.add_argument("--compute-dtype", choices=tuple(COMPUTE_DTYPES), default="float32",
                    help="the ternary step's activation dtype (TrainConfig.compute_dtype)")


def step_setup(args: argparse.Namespace) -> tuple[Config, torch.Tensor, torch.device]:
    """(config, random byte batch, device) of :func:`add_step_arguments`' options; sets the matmul precision. The
    MoE takes its dense dispatch for the whole batch: only that one compiles as one graph (with graph breaks,
    torch 2.11's compiled objective lost aux["vq_indices"]: a KeyError)."""
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    cfg = with_dense_moe(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, batch_size=args.batch, context=args.context, compute_dtype=args.compute_dtype)),
        args.batch * args.context)
    ids = torch.randint(0, 256, (args.batch, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    return cfg, ids, device


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap)
    ap.add_argument("--skip-full", action="store_true", help="byte path only")
    ap.add_argument("--layouts", default="",
                    help="comma list of extra byte-path update layouts to time compiled: 'stochastic' (no flip "
                         "counters), 'annealed' (the same, θ 64 -> 2048 over 1000 steps), 'nibble' (4-bit counters, "
                         "flip threshold 7), 'chain' (a place bit per weight, fixed exponents; its update runs the "
                         "pure-torch reference on every device)")
    ap.add_argument("--reps", type=int, default=8,
                    help="timed steps per row (their median is the row's time; graphed rows move by ~10%% between "
                         "runs at 8)")
    ap.add_argument("--kinds", default=",".join(STEP_KINDS),
                    help="comma list of the step kinds to time, ternary and twin alike (the layouts' rows skip "
                         "eager): " + ", ".join(STEP_KINDS))
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in STEP_KINDS for k in kinds):
        raise SystemExit(f"--kinds takes a comma list of {', '.join(STEP_KINDS)}; got {args.kinds!r}")
    cfg, ids, device = step_setup(args)
    rows = [] if args.skip_full else ternary_rows(cfg, "full model", ids, device, kinds, args.reps)
    rows += ternary_rows(byte_path_config(cfg), "byte path", ids, device, kinds, args.reps)
    for layout in filter(None, args.layouts.split(",")):
        rows += ternary_rows(byte_path_config(with_layout(cfg, layout)), f"byte path, {layout}", ids, device,
                             tuple(k for k in kinds if k != "eager"), args.reps)
    rows += twin_rows(cfg, ids, device, args.reps, kinds)
    print(f"device: {describe(device)}; preset {args.preset}; batch [{args.batch}, {args.context}]; "
          f"MoE dense dispatch up to {cfg.model.moe.dense_limit} tokens; "
          f"fp32 matmul precision {args.matmul_precision}; ternary activations {args.compute_dtype}")
    print(format_table(["step", "ms", "ms back to back", "tokens/s", "peak MB", "weights", "state B/weight"], rows))
    print("ms: median of steps synced one by one; back to back: the mean with one sync after all of them; "
          "tokens/s from ms")


if __name__ == "__main__":
    main()
