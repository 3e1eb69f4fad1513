"""Pre-norm causal transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

from __future__ import annotations

from typing import Any

import torch

from arbfn.layers.attention import attention, init_attention
from arbfn.layers.mlp import init_mlp, mlp
from arbfn.layers.norm import init_rmsnorm, rmsnorm


def init_block(d_model: int, d_ff: int, group_size: int, generator: torch.Generator | None) -> dict[str, Any]:
    """Norms, attention and MLP of one block."""
    return {"norm1": init_rmsnorm(d_model, group_size, generator),
            "attn": init_attention(d_model, group_size, generator),
            "norm2": init_rmsnorm(d_model, group_size, generator),
            "mlp": init_mlp(d_model, d_ff, group_size, generator)}


def block(p: dict[str, Any], x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """One residual block over x [B, T, d_model]."""
    x = x + attention(p["attn"], rmsnorm(p["norm1"], x), n_heads)
    return x + mlp(p["mlp"], rmsnorm(p["norm2"], x))
