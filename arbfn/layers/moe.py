"""Mixture of ternary-MLP experts with a ternary top-k router, and its ACT loop (SYSTEM.md "MoE").

Small inputs (N <= ``dense_limit`` tokens) take a fixed-shape dense dispatch: every expert runs on all
tokens and ``kernels.moe.route_combine`` mixes them with weight 0 where unselected (compile-friendly).
Larger inputs take the sparse dispatch: each expert runs only on its routed tokens. Both give the same
result. :func:`moe_act` repeats ``x <- x + moe(x)`` per token until the halting probes say stop.
"""

from __future__ import annotations

from typing import Any

import torch

from arbfn.layers.mlp import init_mlp, mlp
from arbfn.loops import act_eager, act_fixed
from arbfn.ternary import init_ternary, linear
from kernels.moe import route_combine

MoEParams = dict[str, Any]


def init_moe(d_model: int, d_ff: int, n_experts: int, group_size: int,
             generator: torch.Generator | None) -> MoEParams:
    """Router [n_experts, d_model], ``n_experts`` MLPs (up [d_ff, d_model], down [d_model, d_ff]), halt [1, d_model]."""
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    return {"router": init_ternary(n_experts, d_model, group_size, generator),
            "experts": [init_mlp(d_model, d_ff, group_size, generator) for _ in range(n_experts)],
            "halt": init_ternary(1, d_model, group_size, generator)}


def _check(p: MoEParams, x: torch.Tensor, top_k: int, ranks: tuple[int, ...]) -> None:
    n_experts, d_model = p["router"].out_features, p["router"].in_features
    if len(p["experts"]) != n_experts:
        raise ValueError(f"the router scores {n_experts} experts but params hold {len(p['experts'])}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
    if not x.is_floating_point():
        raise TypeError(f"moe expects float inputs, got {x.dtype}")
    if x.dim() not in ranks or x.shape[-1] != d_model:
        shapes = " or ".join("[" + ", ".join(["..."] * (r - 1) + [str(d_model)]) + "]" for r in ranks)
        raise ValueError(f"moe expects x of shape {shapes}, got {tuple(x.shape)}")


def route(p: MoEParams, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [N, E] (softmax over each token's top-k router logits, 0 elsewhere) and top-k ids [N, k]."""
    logits = linear(p["router"], x)
    top, ids = logits.topk(top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, ids, torch.softmax(top, dim=-1))
    return weights, ids


def moe(p: MoEParams, x: torch.Tensor, top_k: int, dense_limit: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Top-k mixture of experts on tokens x [N, d_model] -> (y [N, d_model], {"load": int64 [E] tokens per expert})."""
    _check(p, x, top_k, (2,))
    weights, ids = route(p, x, top_k)
    n_experts = len(p["experts"])
    load = torch.zeros(n_experts, dtype=torch.int64, device=x.device).scatter_add(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int64, device=x.device))
    if x.shape[0] <= dense_limit:
        outs = torch.stack([mlp(e, x) for e in p["experts"]])
        return route_combine(outs, weights.to(outs.dtype)), {"load": load}
    y = torch.zeros_like(x)
    for e, expert in enumerate(p["experts"]):
        rows = (ids == e).any(dim=-1).nonzero().squeeze(1)
        if rows.numel():
            ye = mlp(expert, x.index_select(0, rows))
            y = y.index_add(0, rows, ye * weights.index_select(0, rows)[:, e:e + 1].to(ye.dtype))
    return y, {"load": load}


def moe_act_step(p: MoEParams, x: torch.Tensor, top_k: int, dense_limit: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One ACT step shared by the eager and fixed loops: (x + moe(x), halting probability [N] of the new state)."""
    y, _ = moe(p, x, top_k, dense_limit)
    x_next = x + y
    return x_next, torch.sigmoid(linear(p["halt"], x_next).squeeze(-1).float())


def moe_act(p: MoEParams, x: torch.Tensor, top_k: int, max_steps: int = 4, threshold: float = 0.99,
            fixed: bool = False, dense_limit: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ACT over :func:`moe_act_step` with every token an ACT item; x [B, T, d] or [N, d] -> (out like x, aux).

    ``fixed`` picks :func:`act_fixed` (always ``max_steps``, compile-friendly) over :func:`act_eager`; both
    give the same result. aux: ``ponder`` (mean over tokens), ``steps`` (int64, per token, x's leading shape).
    """
    _check(p, x, top_k, (2, 3))
    tokens = x.reshape(-1, x.shape[-1])
    loop = act_fixed if fixed else act_eager
    res = loop(lambda i, h: moe_act_step(p, h, top_k, dense_limit), tokens, max_steps, threshold)
    return res.output.reshape(x.shape), {"ponder": res.ponder.mean(), "steps": res.steps.reshape(x.shape[:-1])}
