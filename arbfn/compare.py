"""Ternary sign-vote training against its float twin on the same corpus, batches and steps.

Both sides are the byte path only: the preset's :class:`ModelConfig` with VQ, graph, memory and MoE
switched off (:func:`byte_path_config`), so the ternary model and :class:`arbfn.twin.FloatTwin` have the
same architecture. The ternary side still carries its (tiny) output router and video/talker heads, and
its objective adds the router's term; held-out bits/byte is the byte loss alone on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from arbfn import data as data_mod
from arbfn.audit import audit
from arbfn.config import Config
from arbfn.model import State, init_model
from arbfn.ternary import to_device, weights
from arbfn.train import StepFn, evaluate, train_step
from arbfn.twin import FloatTwin, evaluate_twin, make_optimizer, twin_step

BYTE_PATH = ("text", "blocks", "norm", "head")  # the params areas the twin mirrors
ARCHITECTURE = ("same architecture on both sides: byte path only (text sequencer, causal blocks, RMSNorm, "
                "byte head); VQ, graph, memory and MoE off")
BatchHook = Callable[[str, int, torch.Tensor], None]


def byte_path_config(cfg: Config) -> Config:
    """``cfg`` with VQ, graph, memory and MoE off: the architecture the float twin mirrors."""
    off = dict(enable_vq=False, enable_graph=False, enable_memory=False, enable_moe=False)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **off))


def byte_path_weights(state: State) -> int:
    """Logical ternary weights of the byte path (text, blocks, final norm, byte head)."""
    return sum(w.num_weights for area in BYTE_PATH for w in weights(state.params[area]))


def compare(cfg: Config, corpus: bytes, steps: int | None = None, eval_every: int = 20, lr: float = 3e-3,
            on_batch: BatchHook | None = None,
            on_eval: Callable[[int, float, float], None] | None = None,
            device: torch.device | str = "cpu", step_fn: StepFn = train_step) -> dict[str, Any]:
    """Train the byte path of ``cfg`` ternary and float for ``steps`` (default ``cfg.train.steps``) on one
    batch stream on ``device``; held-out bits/byte of both every ``eval_every`` steps, at step 0 and at the end.

    ``on_batch(side, step, batch)`` sees each batch as a side trains on it ("ternary" / "float");
    ``on_eval(step, bpb_ternary, bpb_float)`` sees each evaluation. ``step_fn`` trains the ternary side (default
    :func:`arbfn.train.train_step`; research rules pass their own, benchmarks/chain_rule.py).
    """
    steps = cfg.train.steps if steps is None else steps
    if steps < 1 or eval_every < 1:
        raise ValueError(f"compare needs steps >= 1 and eval_every >= 1, got steps={steps} eval_every={eval_every}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    cfg = byte_path_config(cfg)
    tc = cfg.train
    train_data, held_out = data_mod.split_corpus(corpus, tc.held_out_fraction)
    stream = data_mod.iterate_batches(train_data, tc.batch_size, tc.context, tc.seed)
    device = torch.device(device)
    eval_set = [b.to(device) for b in data_mod.eval_batches(held_out, tc.batch_size, tc.context)[: tc.eval_batches]]
    state = to_device(init_model(cfg, torch.Generator().manual_seed(tc.seed)), device)  # counters laid out by cfg
    twin = FloatTwin(cfg.model, torch.Generator().manual_seed(tc.seed)).to(device)
    opt = make_optimizer(twin, lr)
    curve: dict[str, list[float]] = {"step": [], "ternary": [], "float": []}
    seconds = {"ternary": 0.0, "float": 0.0}

    def record(step: int) -> None:
        bt, bf = evaluate(state, eval_set), evaluate_twin(twin, eval_set)
        for k, v in (("step", step), ("ternary", bt), ("float", bf)):
            curve[k].append(v)
        if on_eval is not None:
            on_eval(step, bt, bf)

    record(0)
    for i in range(1, steps + 1):
        batch = next(stream).to(device)
        for side in ("ternary", "float"):
            if on_batch is not None:
                on_batch(side, i, batch)
            t0 = time.perf_counter()
            if side == "ternary":
                state, _ = step_fn(state, batch, cfg)
            else:
                twin_step(twin, opt, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[side] += time.perf_counter() - t0
        if i % eval_every == 0 or i == steps:
            record(i)
    bt, bf = curve["ternary"][-1], curve["float"][-1]
    return {
        "preset": cfg.name, "architecture": ARCHITECTURE, "model": dataclasses.asdict(cfg.model),
        "device": str(device), "steps": steps, "eval_every": eval_every, "batch_size": tc.batch_size,
        "context": tc.context, "ternary_compute_dtype": tc.compute_dtype,
        "eval_batches": len(eval_set), "update": dataclasses.asdict(cfg.update),
        "float_optimizer": f"AdamW lr {lr:g}, fp32, no weight decay",
        "bpb_ternary": bt, "bpb_float": bf, "ratio": bt / bf,
        "bytes_per_weight": audit(state)["bytes_per_weight"],
        "byte_path_weights": byte_path_weights(state), "float_params": sum(p.numel() for p in twin.parameters()),
        "train_seconds": seconds, "curves": curve,
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of both held-out curves and the summary line."""
    c = result["curves"]
    u = result["update"]
    mode = f"{u['flip_mode']} flips" + (f" ({u['counter_bits']}-bit counters)" if u["flip_mode"] == "counter" else "")
    if u["flip_mode"] == "chain":
        mode += f" (scale {u['chain_scale']:g}, power {u['chain_power']:g})"
    flip = str(u["flip_threshold"])
    if u.get("flip_threshold_final"):
        flip += (f" annealed to {u['flip_threshold_final']} over {u['anneal_steps']} steps"
                 f"{' on a cosine' if u.get('anneal_shape') == 'cosine' else ''}")
    exps = "exponents fixed" if u["flip_mode"] == "chain" else f"exponent threshold {u['exp_threshold']}"
    exps += ", norm gains fixed" if u.get("fixed_norm_gains") else ""
    lines = [result["architecture"], f"ternary sign votes: {mode}, flip threshold "
             f"{flip}, {exps}, "
             f"{result.get('ternary_compute_dtype', 'float32')} activations; float twin: {result['float_optimizer']}",
             f"{'step':>6}  {'ternary bpb':>11}  {'float bpb':>9}"]
    lines += [f"{s:>6}  {t:>11.4f}  {f:>9.4f}" for s, t, f in zip(c["step"], c["ternary"], c["float"])]
    lines.append(f"after {result['steps']} steps: ternary {result['bpb_ternary']:.4f} / float "
                 f"{result['bpb_float']:.4f} bits/byte = ratio {result['ratio']:.3f}; "
                 f"ternary state {result['bytes_per_weight']:.3f} bytes/weight")
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: Path) -> Path:
    """PNG of both held-out bits/byte curves against steps."""
    from arbfn.report import save_figure  # selects the headless Agg backend before pyplot loads

    import matplotlib.pyplot as plt

    c = result["curves"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c["step"], c["ternary"], marker="o", ms=3, label="ternary sign votes")
    ax.plot(c["step"], c["float"], marker="o", ms=3, label=f"float twin ({result['float_optimizer']})")
    return save_figure(fig, ax, "held-out bits/byte", f"arbfn {result['preset']} byte path: ternary vs float twin", path)


def write_outputs(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/compare.png`` and ``out_dir/compare.json``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "compare.json"
    js.write_text(json.dumps(result, indent=2) + "\n")
    return plot_compare(result, out_dir / "compare.png"), js
