"""The three halting loops, eager (early exit, a host sync per step) against their fixed-step variant
compiled with ``torch.compile(fullgraph=True)``, at batch 1 and 32, forward (inference) in one run.

Shapes are the ``small`` preset's: graph hops over its 8192 VQ codes, the MoE ACT loop (8 experts, top-2),
the VideoHead denoise loop (16 steps, latents (B, 16, 1, 32, 32)). "graphs" adds CUDA-graph replay (``mode="reduce-overhead"``). The eager MoE uses the model's own
dispatch (sparse above ``dense_limit`` tokens); the compiled one the dense dispatch (the sparse one has a
data-dependent shape), which the model's tests prove equal.

    python -m benchmarks.loops [--device cuda] [--context 64]
"""

from __future__ import annotations

import argparse
import functools

import torch

from arbfn.config import preset
from arbfn.layers.graph import graph, init_graph
from arbfn.layers.heads import init_video_head, video_head
from arbfn.layers.moe import init_moe, moe_act
from arbfn.ternary import to_device
from benchmarks._timing import describe, format_table, median_ms, sync_ms


def loop_cases(device: torch.device, batch: int, context: int):
    """(name, eager fn, fixed fn, compiled-fixed fn) per loop, with inputs drawn once."""
    m = preset("small").model
    gen = torch.Generator().manual_seed(0)
    gs, d = m.group_size, m.d_model
    x = torch.randn(batch, context, d, generator=gen).to(device)
    idx = torch.randint(0, m.vq.n_codes, (batch, context), generator=gen).to(device)
    gp = to_device(init_graph(m.vq.n_codes, m.graph.d_node, d, m.graph.edges_per_node, gs, gen), device)
    mp = to_device(init_moe(d, m.moe.d_ff, m.moe.n_experts, gs, gen), device)
    vp = to_device(init_video_head(d, m.heads.video_max_steps, gs, gen), device)
    latent = torch.randn(batch, 16, 1, 32, 32, generator=gen).to(device)
    n_tokens = batch * context
    runs = {
        "graph hops": lambda fixed: graph(gp, x, idx, m.graph.max_hops, m.act_threshold, fixed=fixed),
        "MoE ACT": lambda fixed: moe_act(mp, x, m.moe.top_k, m.moe.max_steps, m.act_threshold, fixed=fixed,
                                         dense_limit=max(n_tokens, m.moe.dense_limit) if fixed else m.moe.dense_limit),
        "video denoise": lambda fixed: video_head(vp, x, latent, m.heads.video_max_steps, m.act_threshold, fixed=fixed),
    }
    graphs = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs replay the fixed loop's launches
    for name, run in runs.items():
        fixed = functools.partial(run, True)
        yield name, functools.partial(run, False), fixed, torch.compile(fixed, fullgraph=True), \
            torch.compile(fixed, fullgraph=True, mode=graphs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=64, help="positions per item")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    with torch.no_grad():
        for batch in args.batches:
            for name, eager, fixed, compiled, graphed in loop_cases(device, batch, args.context):
                torch._dynamo.reset()  # each case recompiles the same closures: start from an empty cache
                t_eager = sync_ms(eager, device)
                t_fixed = sync_ms(fixed, device)
                t_comp = median_ms(compiled, device)
                t_graph = median_ms(graphed, device)
                rows.append([name, batch, t_eager, t_fixed, t_comp, t_graph, t_eager / t_comp, t_eager / t_graph])
    print(f"device: {describe(device)}; context {args.context}; forward only (torch.no_grad)")
    print(format_table(["loop", "batch", "eager ms", "fixed eager ms", "compiled ms", "compiled+graphs ms",
                        "eager/compiled", "eager/graphs"], rows))


if __name__ == "__main__":
    main()
