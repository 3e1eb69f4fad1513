"""Causal self-attention with ternary q/k/v/o projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arbfn.ternary import TernaryWeight, init_ternary, linear


def init_attention(d_model: int, group_size: int, generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """Four [d_model, d_model] projections."""
    return {name: init_ternary(d_model, d_model, group_size, generator) for name in ("q", "k", "v", "o")}


def attention(p: dict[str, TernaryWeight], x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Causal multi-head attention over x [B, T, d_model]."""
    b, t, d = x.shape
    q, k, v = (linear(p[n], x).view(b, t, n_heads, d // n_heads).transpose(1, 2) for n in ("q", "k", "v"))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return linear(p["o"], y.transpose(1, 2).reshape(b, t, d))
