"""ACT halting loops, each in two variants that share one step function.

``step_fn(i, x) -> (x_next, p)`` advances the loop state ``x`` ([B, ...]) and gives a halting
probability ``p`` ([B], in (0, 1)) per item. Standard ACT (Graves 2016) with threshold ``threshold``:
an item halts at the first step where its cumulative probability reaches the threshold (or at
``max_steps``); that step is weighted by the remainder ``1 - sum of earlier p``, earlier steps by
their ``p``. The output is the weighted sum of the per-step states; ``ponder = steps + remainder``.

- :func:`act_eager` stops as soon as every item has halted (a data-dependent Python loop).
- :func:`act_fixed` always runs ``max_steps`` with masks: a halted item's accumulators stop changing.
  It has no data-dependent control flow, so ``torch.compile(fullgraph=True)`` can fuse it.

Both return the same :class:`ActResult` on every input.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

StepFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class ActResult:
    """Weighted output, the last state of each item, steps taken, remainder and ponder cost ([B] each)."""

    output: torch.Tensor
    state: torch.Tensor
    steps: torch.Tensor
    remainder: torch.Tensor
    ponder: torch.Tensor


@dataclasses.dataclass
class _Carry:
    x: torch.Tensor
    out: torch.Tensor
    cum: torch.Tensor
    halted: torch.Tensor
    steps: torch.Tensor
    remainder: torch.Tensor


def _check(max_steps: int, threshold: float) -> None:
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _init(x: torch.Tensor) -> _Carry:
    b = x.shape[0]
    zeros = x.new_zeros(b, dtype=torch.float32)
    return _Carry(x, torch.zeros_like(x), zeros, torch.zeros(b, dtype=torch.bool, device=x.device),
                  torch.zeros(b, dtype=torch.int64, device=x.device), zeros)


def _act_step(c: _Carry, i: int, step_fn: StepFn, max_steps: int, threshold: float) -> _Carry:
    x_next, p = step_fn(i, c.x)
    p = p.float()
    active = ~c.halted
    halts_now = active & ((c.cum + p >= threshold) | (i == max_steps - 1))
    weight = torch.where(halts_now, 1.0 - c.cum, torch.where(active, p, torch.zeros_like(p)))
    shape = (-1,) + (1,) * (x_next.dim() - 1)
    return _Carry(
        x=torch.where(active.view(shape), x_next, c.x),
        out=c.out + weight.view(shape).to(x_next.dtype) * x_next,
        cum=c.cum + weight,
        halted=c.halted | halts_now,
        steps=c.steps + active.to(torch.int64),
        remainder=torch.where(halts_now, 1.0 - c.cum, c.remainder),
    )


def _result(c: _Carry) -> ActResult:
    return ActResult(c.out, c.x, c.steps, c.remainder, c.steps.to(c.remainder.dtype) + c.remainder)


def act_eager(step_fn: StepFn, x: torch.Tensor, max_steps: int, threshold: float = 0.99) -> ActResult:
    """ACT loop that exits once every item has halted (syncs with the device each step)."""
    _check(max_steps, threshold)
    c = _init(x)
    for i in range(max_steps):
        c = _act_step(c, i, step_fn, max_steps, threshold)
        if bool(c.halted.all()):
            break
    return _result(c)


def act_fixed(step_fn: StepFn, x: torch.Tensor, max_steps: int, threshold: float = 0.99) -> ActResult:
    """ACT loop that always runs ``max_steps`` steps with masks (compile-friendly, same result as eager)."""
    _check(max_steps, threshold)
    c = _init(x)
    for i in range(max_steps):
        c = _act_step(c, i, step_fn, max_steps, threshold)
    return _result(c)
