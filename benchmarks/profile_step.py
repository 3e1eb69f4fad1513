"""Where a train step's time goes: the compiled ternary byte-path step split into its phases (objective
forward, backward to the probe gradients, sign-vote update and counters), each timed with a device sync,
the whole step compiled and (CUDA) replayed as a CUDA graph, then the kernels that fill the step under
``torch.profiler`` (the graphed step on CUDA), next to the float twin's step (likewise) in the same run.

    python -m benchmarks.profile_step [--device cuda] [--preset small] [--batch 16] [--context 256]
                                      [--rows 25] [--matmul-precision highest|high]

The phase times are host medians with a sync after each phase, so they add launch gaps that the whole step
may overlap; the profiler tables list device time per kernel name over ``--steps`` profiled steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.profiler import ProfilerActivity, profile

from arbfn.compare import byte_path_config
from arbfn.compiled import CompiledTrainStep
from arbfn.config import Config, preset
from arbfn.graphed import GraphedTrainStep
from arbfn.ternary import make_probes
from arbfn.train import apply_update
from arbfn.twin import FloatTwin, twin_loss
from benchmarks._timing import describe, format_table, sync_ms
from benchmarks.train_step import captured, ternary_state


def fresh_probes(state, dtype: torch.dtype) -> Any:
    """Zero probe leaves of ``dtype`` that require grad, as CompiledTrainStep makes them."""
    return pytree.tree_map(lambda p: None if p is None else p.detach().requires_grad_(),
                           make_probes(state.params, dtype))


def probe_grads(loss: torch.Tensor, probes: Any) -> Any:
    """The gradient tree of ``loss`` with respect to the live ``probes``."""
    leaves, spec = pytree.tree_flatten(probes)
    live = [p for p in leaves if p is not None]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return pytree.tree_unflatten([None if p is None else next(got) for p in leaves], spec)


def phase_rows(cfg: Config, ids: torch.Tensor, device: torch.device) -> tuple[list[list], Callable[[], None]]:
    """Rows of per-phase times of the compiled ternary step, and a callable running one whole step."""
    step = CompiledTrainStep(cfg)
    box = {"state": ternary_state(cfg, device)}

    def forward() -> None:
        step.objective(fresh_probes(box["state"], cfg.train.dtype), box["state"], ids)

    def forward_backward() -> Any:
        probes = fresh_probes(box["state"], cfg.train.dtype)
        loss, _ = step.objective(probes, box["state"], ids)
        return probe_grads(loss, probes)

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


def twin_step(cfg: Config, ids: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """One float-twin AdamW step under bf16 autocast, as benchmarks.train_step times it: compiled, and on CUDA
    replayed as a CUDA graph."""
    model = FloatTwin(cfg.model, torch.Generator().manual_seed(0)).to(device)
    forward = torch.compile(model)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=cuda, capturable=cuda)
    autocast = torch.autocast(device.type, torch.bfloat16) if cuda else contextlib.nullcontext()

    def run() -> None:
        opt.zero_grad(set_to_none=not cuda)
        with autocast:
            loss = twin_loss(forward, ids)
        loss.backward()
        opt.step()

    return captured(run) if cuda else run


def kernel_table(fn: Callable[[], None], device: torch.device, steps: int, rows: int) -> str:
    """The profiler's per-name table of ``steps`` calls of ``fn`` (after two warm-up calls), by self device time."""
    fn()
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per table")
    ap.add_argument("--rows", type=int, default=25, help="kernel names per table")
    ap.add_argument("--matmul-precision", choices=("highest", "high"), default="highest")
    args = ap.parse_args(argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    cfg = byte_path_config(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, batch_size=args.batch, context=args.context)))
    ids = torch.randint(0, 256, (args.batch, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    rows, whole = phase_rows(cfg, ids, device)
    twin = twin_step(cfg, ids, device)
    rows.append(["float twin step (bf16 autocast + AdamW, compiled" + (", CUDA graph)" if device.type == "cuda"
                                                                        else ")"), sync_ms(twin, device, warmup=2, reps=8)])
    print(f"device: {describe(device)}; preset {args.preset} byte path; batch [{args.batch}, {args.context}]; "
          f"fp32 matmul precision {args.matmul_precision}")
    print(format_table(["phase", "ms"], rows))
    print(f"\nternary step ({rows[-2][0]}): kernels by self device time over", args.steps, "steps")
    print(kernel_table(whole, device, args.steps, args.rows))
    print("\nfloat twin step: kernels by self device time over", args.steps, "steps")
    print(kernel_table(twin, device, args.steps, args.rows))


if __name__ == "__main__":
    main()
