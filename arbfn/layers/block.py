"""Pre-norm causal transformer blocks: x + attn(norm(x)), then + mlp(norm(x)), each residual add fused into
the norm that follows it."""

from __future__ import annotations

from typing import Any

import torch

from arbfn.layers.attention import attention, init_attention
from arbfn.layers.mlp import init_mlp, mlp
from arbfn.layers.norm import add_rmsnorm, init_rmsnorm, rmsnorm


def init_block(d_model: int, d_ff: int, group_size: int, generator: torch.Generator | None) -> dict[str, Any]:
    """Norms, attention and MLP of one block."""
    return {"norm1": init_rmsnorm(d_model, group_size, generator),
            "attn": init_attention(d_model, group_size, generator),
            "norm2": init_rmsnorm(d_model, group_size, generator),
            "mlp": init_mlp(d_model, d_ff, group_size, generator)}


def blocks(ps: list[dict[str, Any]], x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The residual blocks ``ps`` in order over x [B, T, d_model]. Each add but the last is fused into the next
    norm (:func:`add_rmsnorm`): one kernel stores the sum and its normalisation, and one returns both gradients."""
    if not ps:
        return x
    y = rmsnorm(ps[0]["norm1"], x)
    for i, p in enumerate(ps):
        x, y = add_rmsnorm(p["norm2"], x, attention(p["attn"], y, n_heads))
        out = mlp(p["mlp"], y)
        if i + 1 < len(ps):
            x, y = add_rmsnorm(ps[i + 1]["norm1"], x, out)
    return x + out
