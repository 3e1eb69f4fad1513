"""Where a train step's time goes: the compiled ternary byte-path step split into its phases (objective
forward, backward to the probe gradients, sign-vote update and counters), each timed with a device sync,
the whole step compiled and (CUDA) replayed as a CUDA graph, then the kernels that fill the step under
``torch.profiler`` (the graphed step on CUDA), next to the float twin's step (likewise) in the same run.

    python -m benchmarks.profile_step [--device cuda] [--preset small] [--batch 16] [--context 256]
                                      [--rows 25] [--matmul-precision highest|high]
                                      [--compute-dtype float32|bfloat16] [--layout stochastic|annealed|nibble]

The phase times are host medians with a sync after each phase, so they add launch gaps that the whole step
may overlap; the profiler tables list device time per kernel name over ``--steps`` profiled steps.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from arbfn.compare import byte_path_config
from arbfn.compiled import CompiledTrainStep
from arbfn.config import Config
from arbfn.graphed import GraphedTrainStep
from arbfn.train import apply_update
from benchmarks._timing import describe, device_sync, format_table, sync_ms
from benchmarks.train_step import LAYOUTS, add_step_arguments, step_setup, ternary_state, twin_step, with_layout


def phase_rows(cfg: Config, ids: torch.Tensor, device: torch.device) -> tuple[list[list], Callable[[], None]]:
    """Rows of per-phase times of the compiled ternary step, and a callable running one whole step."""
    step = CompiledTrainStep(cfg)
    box = {"state": ternary_state(cfg, device)}

    def forward() -> None:
        step.objective(step.probes(box["state"]), box["state"], ids)

    def forward_backward() -> Any:
        probes = step.probes(box["state"])
        loss, _ = step.objective(probes, box["state"], ids)
        return step.probe_gradients(loss, probes)

    grads = forward_backward()

    def update() -> None:
        apply_update(box["state"], grads, cfg.update)

    def whole() -> None:
        box["state"], _ = step(box["state"], ids)

    graphed = GraphedTrainStep(cfg, step)

    def whole_graphed() -> None:
        box["state"], _ = graphed(box["state"], ids)

    phases = [("objective forward", forward), ("forward + backward", forward_backward),
              ("update (eager, all weights)", update), ("whole step, compiled", whole)]
    if device.type == "cuda":
        phases.append(("whole step, compiled, CUDA graph", whole_graphed))
    rows = [[name, sync_ms(fn, device, warmup=2, reps=8)] for name, fn in phases]
    return rows, phases[-1][1]


def kernel_table(fn: Callable[[], None], device: torch.device, steps: int, rows: int) -> str:
    """The profiler's per-name table of ``steps`` calls of ``fn`` (after two warm-up calls), by self device time."""
    fn()
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        device_sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per table")
    ap.add_argument("--rows", type=int, default=25, help="kernel names per table")
    ap.add_argument("--layout", choices=tuple(LAYOUTS), help="the update rule's state layout (default: int8 counters)")
    args = ap.parse_args(argv)
    cfg, ids, device = step_setup(args)
    cfg = byte_path_config(with_layout(cfg, args.layout) if args.layout else cfg)
    rows, whole = phase_rows(cfg, ids, device)
    twin_kind = "CUDA graph" if device.type == "cuda" else "compiled"
    twin, _ = twin_step(cfg, ids, device, twin_kind)
    rows.append([f"float twin step (bf16 autocast + AdamW, {twin_kind})", sync_ms(twin, device, warmup=2, reps=8)])
    print(f"device: {describe(device)}; preset {args.preset} byte path; batch [{args.batch}, {args.context}]; "
          f"fp32 matmul precision {args.matmul_precision}; ternary activations {args.compute_dtype}; "
          f"update layout {args.layout or 'int8 counters'}")
    print(format_table(["phase", "ms"], rows))
    print(f"\nternary step ({rows[-2][0]}): kernels by self device time over", args.steps, "steps")
    print(kernel_table(whole, device, args.steps, args.rows))
    print("\nfloat twin step: kernels by self device time over", args.steps, "steps")
    print(kernel_table(twin, device, args.steps, args.rows))


if __name__ == "__main__":
    main()
