"""RMSNorm with a ternary gain (trits start at +1, scale 2**0): no float parameter."""

from __future__ import annotations

import torch

from arbfn.ternary import TernaryWeight, init_ternary
from kernels.add_rmsnorm import ternary_add_rmsnorm
from kernels.rmsnorm import ternary_rmsnorm


def init_rmsnorm(dim: int, group_size: int, generator: torch.Generator | None) -> TernaryWeight:
    """Gain of ones, stored as a [1, dim] ternary weight."""
    return init_ternary(1, dim, group_size, generator, exponent=0, trits=1)


def rmsnorm(w: TernaryWeight, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x) * gain`` over the last dim, through the ternary RMSNorm op (fp32 math, x's dtype out)."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"rmsnorm expects inputs with {w.in_features} features, got shape {tuple(x.shape)}")
    return ternary_rmsnorm(x, w.packed, w.exp, w.probe, eps, w.group_size)


def add_rmsnorm(w: TernaryWeight, x: torch.Tensor, r: torch.Tensor, eps: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = x + r, rmsnorm(h)): a residual add and the norm after it, one fused op each way."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"rmsnorm expects inputs with {w.in_features} features, got shape {tuple(x.shape)}")
    return ternary_add_rmsnorm(x, r, w.packed, w.exp, w.probe, eps, w.group_size)
