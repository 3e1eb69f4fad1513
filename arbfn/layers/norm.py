"""RMSNorm with a ternary gain (trits start at +1, scale 2**0): no float parameter."""

from __future__ import annotations

import torch

from arbfn.ternary import TernaryWeight, decode, init_ternary


def init_rmsnorm(dim: int, group_size: int, generator: torch.Generator | None) -> TernaryWeight:
    """Gain of ones, stored as a [1, dim] ternary weight."""
    return init_ternary(1, dim, group_size, generator, exponent=0, trits=1)


def rmsnorm(w: TernaryWeight, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x) * gain`` over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * decode(w, x.dtype)[0]
