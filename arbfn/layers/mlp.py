"""Two-layer ternary MLP with GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arbfn.ternary import TernaryWeight, init_ternary, linear


def init_mlp(d_model: int, d_ff: int, group_size: int, generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """Up [d_ff, d_model] and down [d_model, d_ff] projections."""
    return {"up": init_ternary(d_ff, d_model, group_size, generator),
            "down": init_ternary(d_model, d_ff, group_size, generator)}


def mlp(p: dict[str, TernaryWeight], x: torch.Tensor) -> torch.Tensor:
    """``down(gelu(up(x)))``."""
    return linear(p["down"], F.gelu(linear(p["up"], x)))
