"""Graph over VQ codes: message-passing hops with ACT halting, read back into positions by VQ index.

Nodes are the VQ codes; the edge list (src/dst int32, attr int8 in {-1, 0, 1}, score int8) is integer
state. A hop is ``h <- h + gelu(msg(edge_aggregate(h)))`` over all nodes, repeated under ACT (the
nodes are the ACT items). Each position then adds the projected state of its own node (gather +
residual). Edge scores learn by Hebbian counting of consecutive VQ transitions
(:func:`update_graph_counters`), not by gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from arbfn.checking import checking_data
from arbfn.loops import act_eager, act_fixed
from arbfn.ternary import embed, init_ternary, linear
from kernels.graph import edge_aggregate, gather_residual

INIT_SCORE = 16
"""Initial edge score: ``|w| = 16/127 ~ 0.13`` makes the first hops a small residual perturbation,
positive so the sign comes from attr alone, and far enough from 0 that a few Hebbian -1s do not flip
an edge yet far below 127 so reinforcement has room (111 steps) to grow it."""


def init_graph(n_nodes: int, d_node: int, d_model: int, edges_per_node: int, group_size: int,
               generator: torch.Generator | None) -> dict[str, Any]:
    """Node embeddings, message/halt/output projections and ``n_nodes * edges_per_node`` random out-edges."""
    if min(n_nodes, d_node, d_model, edges_per_node) < 1:
        raise ValueError(f"graph sizes must be positive, got n_nodes={n_nodes}, d_node={d_node}, "
                         f"d_model={d_model}, edges_per_node={edges_per_node}")
    e = n_nodes * edges_per_node
    p: dict[str, Any] = {
        "node_embed": init_ternary(n_nodes, d_node, group_size, generator, exponent=0),
        "msg": init_ternary(d_node, d_node, group_size, generator),
        "halt": init_ternary(1, d_node, group_size, generator),
        "out": init_ternary(d_model, d_node, group_size, generator),
    }
    if generator is None:
        meta = torch.device("meta")
        p["src"] = torch.empty(e, dtype=torch.int32, device=meta)
        p["dst"] = torch.empty(e, dtype=torch.int32, device=meta)
        p["attr"] = torch.empty(e, dtype=torch.int8, device=meta)
        p["score"] = torch.empty(e, dtype=torch.int8, device=meta)
        return p
    p["src"] = torch.arange(n_nodes, dtype=torch.int32).repeat_interleave(edges_per_node)
    p["dst"] = torch.randint(0, n_nodes, (e,), generator=generator, dtype=torch.int32)
    p["attr"] = torch.randint(-1, 2, (e,), generator=generator, dtype=torch.int8)
    p["score"] = torch.full((e,), INIT_SCORE, dtype=torch.int8)
    return p


def graph_hop_step(p: dict[str, Any], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One hop over node states h [V, d_node] -> (h_next, per-node halting probability [V])."""
    agg = edge_aggregate(h, p["src"], p["dst"], p["attr"], p["score"])
    h_next = h + F.gelu(linear(p["msg"], agg))
    return h_next, torch.sigmoid(linear(p["halt"], h_next))[:, 0]


def _check_indices(indices: torch.Tensor, n_nodes: int, shape: tuple[int, ...]) -> None:
    if indices.dtype != torch.int64 or tuple(indices.shape) != shape:
        raise TypeError(f"indices must be int64 of shape {shape}, got {indices.dtype} {tuple(indices.shape)}")
    if checking_data() and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_nodes:
            raise ValueError(f"indices must be in 0..{n_nodes - 1}, got {lo}..{hi}")


def graph(p: dict[str, Any], x: torch.Tensor, indices: torch.Tensor, max_hops: int, threshold: float = 0.99,
          fixed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x [B, T, d_model] + out(node state of each position's VQ index) after up to ``max_hops`` ACT hops.

    Returns ``(x_out, {"ponder": mean ponder over nodes, "hops": steps per node [V]})``. Eagerly only
    the distinct gathered nodes are projected to d_model (``unique``: U <= min(V, B*T) rows, then the
    gather runs on the inverse indices); while compiling, where ``unique``'s data-dependent shape
    cannot be traced, all V nodes are projected. Both give the same result: the projection is per row
    and rows never gathered get an exactly zero gradient.
    """
    n_nodes, d_model = p["node_embed"].out_features, p["out"].out_features
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be [B, T, {d_model}], got {tuple(x.shape)}")
    _check_indices(indices, n_nodes, tuple(x.shape[:2]))
    h0 = embed(p["node_embed"], torch.arange(n_nodes, device=x.device))
    loop = act_fixed if fixed else act_eager
    res = loop(lambda i, h: graph_hop_step(p, h), h0, max_hops, threshold)
    nodes, idx = res.output, indices
    if not torch.compiler.is_compiling():
        used, idx = torch.unique(indices, return_inverse=True)
        nodes = nodes[used]
    x_out = gather_residual(x, linear(p["out"], nodes).to(x.dtype), idx)
    return x_out, {"ponder": res.ponder.mean(), "hops": res.steps}


def _member(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """``torch.isin(values, pool)`` by sort and binary search: fixed shapes, no host sync (CUDA graphs)."""
    if pool.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    ordered = pool.sort().values
    return ordered[torch.searchsorted(ordered, values).clamp_max(pool.numel() - 1)] == values


def update_graph_counters(p: dict[str, Any], indices: torch.Tensor) -> dict[str, Any]:
    """Hebbian edge-score update from the transitions ``indices[:, t] -> indices[:, t+1]`` ([B, T] int64).

    For every source node a seen with a successor: its out-edges to an observed successor get +1, its
    other out-edges get -1 (competition: without it every used edge would just climb to 127 and
    scores would stop telling edges apart). Each distinct transition counts once per call, so a
    repetitive batch cannot swing scores further than one step. Saturates in [-128, 127]; pure.
    """
    n_nodes = p["node_embed"].out_features
    if indices.dim() != 2:
        raise TypeError(f"indices must be [B, T], got shape {tuple(indices.shape)}")
    _check_indices(indices, n_nodes, tuple(indices.shape))
    a, b = indices[:, :-1].reshape(-1), indices[:, 1:].reshape(-1)
    src, dst = p["src"].long(), p["dst"].long()
    hit = _member(src * n_nodes + dst, a * n_nodes + b)
    seen = _member(src, a)
    delta = torch.where(hit, 1, torch.where(seen, -1, 0))
    score = (p["score"].to(torch.int16) + delta).clamp(-128, 127).to(torch.int8)
    return {**p, "score": score}
