"""A residual add fused into the RMSNorm after it: ``h = x + r``, ``y = rmsnorm(h)`` in one kernel each way.

A pre-norm block adds each sublayer's output to the residual stream and normalises the sum at once. As two ops,
the add writes h and the norm reads it back; its backward then adds the norm's dL/dh to the residual gradient in
one more kernel. Here one forward kernel stores h and y, and one backward kernel returns ``gh + dL/dh`` through
the norm. Ops:

* ``arbfn::add_rmsnorm_fwd(x, r, packed, exp, eps, group_size) -> (h, y)``: x, r [..., D] of one dtype; h = x + r
  rounded to that dtype (as ``x + r`` in torch), y = rmsnorm(h) with the ternary gain, as ``arbfn::rmsnorm_fwd``.
* ``arbfn::add_rmsnorm_bwd(gy, gh, h, packed, exp, eps, group_size) -> (dh, partials)``: dh = gh + dL/dh of the
  norm (fp32 sum, one rounding to h's dtype), the gradient of both x and r; partials [P, D] fp32 are dL/dgain
  summed over consecutive row chunks (P = :func:`kernels.rmsnorm.bwd_programs`), which the caller sums in
  traced torch, so a compiled step fuses that sum instead of an eager reduction per norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._vmap import per_sample
from kernels.rmsnorm import (add_rmsnorm_bwd_triton, add_rmsnorm_fwd_triton, bwd_programs, check_norm_args,
                             rmsnorm_bwd_terms, rmsnorm_fwd_reference, ternary_rmsnorm, tile_shape)


def add_rmsnorm_fwd_reference(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch (h = x + r, rmsnorm(h)) in x's dtype."""
    h = x + r
    return h, rmsnorm_fwd_reference(h, packed, exp, eps, group_size)


def add_rmsnorm_bwd_reference(g: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, packed: torch.Tensor,
                              exp: torch.Tensor, eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch (gh + dL/dh in h's dtype, dL/dgain partials [P, D] fp32 over the kernel's row chunks)."""
    d = h.shape[-1]
    grad_h, terms = rmsnorm_bwd_terms(g, h, packed, exp, eps, group_size)
    programs, blocks = bwd_programs(terms.shape[0], d)
    chunk = blocks * tile_shape(d)[0]
    padded = F.pad(terms, (0, 0, 0, programs * chunk - terms.shape[0]))
    return (grad_h + gh.to(torch.float32)).to(h.dtype), padded.view(programs, chunk, d).sum(1)


@torch.library.custom_op("arbfn::add_rmsnorm_fwd", mutates_args=())
def add_rmsnorm_fwd(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = x + r, ``h * rsqrt(mean(h**2) + eps) * (T * 2**E)``) over the last dim."""
    return add_rmsnorm_fwd_reference(x, r, packed, exp, eps, group_size)


@add_rmsnorm_fwd.register_kernel("cuda")
def _(x, r, packed, exp, eps, group_size):
    return add_rmsnorm_fwd_triton(x, r, packed, exp, eps, group_size)


@add_rmsnorm_fwd.register_fake
def _(x, r, packed, exp, eps, group_size):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("arbfn::add_rmsnorm_bwd", mutates_args=())
def add_rmsnorm_bwd(g: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor,
                    eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gh + dL/dh through the norm for upstream gradient ``g``, dL/dgain partials [P, D] fp32)."""
    return add_rmsnorm_bwd_reference(g, gh, h, packed, exp, eps, group_size)


@add_rmsnorm_bwd.register_kernel("cuda")
def _(g, gh, h, packed, exp, eps, group_size):
    return add_rmsnorm_bwd_triton(g, gh, h, packed, exp, eps, group_size)


@add_rmsnorm_bwd.register_fake
def _(g, gh, h, packed, exp, eps, group_size):
    d = h.shape[-1]
    return torch.empty_like(h), h.new_empty((bwd_programs(h.numel() // max(d, 1), d)[0], d), dtype=torch.float32)


def _fwd_vmap_rule(info, in_dims, x, r, packed, exp, eps, group_size):
    """Batched activations fold into the leading dims (one launch); batched gains run one launch per sample."""
    x_dim, r_dim, *gain_dims = in_dims
    if any(d is not None for d in gain_dims):
        outs = per_sample(lambda *a: add_rmsnorm_fwd(*a, eps, group_size), info.batch_size, in_dims, (x, r, packed, exp))
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
    front = [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape) for t, d in ((x, x_dim), (r, r_dim))]
    return add_rmsnorm_fwd(*front, packed, exp, eps, group_size), (0, 0)


def _bwd_vmap_rule(info, in_dims, g, gh, h, packed, exp, eps, group_size):
    """One launch per sample: each sample needs its own dL/dgain partials (per-sample gradients)."""
    outs = per_sample(lambda *a: add_rmsnorm_bwd(*a, eps, group_size), info.batch_size, in_dims[:5],
                      (g, gh, h, packed, exp))
    return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


torch.library.register_vmap("arbfn::add_rmsnorm_fwd", _fwd_vmap_rule)
torch.library.register_vmap("arbfn::add_rmsnorm_bwd", _bwd_vmap_rule)


class _TernaryAddRMSNorm(torch.autograd.Function):
    """Split-style Function: forward/backward call only ops (see kernels/__init__.py)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, r, packed, exp, probe, eps, group_size):
        return add_rmsnorm_fwd(x, r, packed, exp, eps, group_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, packed, exp, probe, eps, group_size = inputs
        ctx.save_for_backward(output[0], packed, exp)
        ctx.eps, ctx.group_size = eps, group_size
        ctx.probe_dtype = probe.dtype if probe is not None else None

    @staticmethod
    def backward(ctx, gh, gy):
        h, packed, exp = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not (needs[0] or needs[1] or needs[4]):
            return None, None, None, None, None, None, None
        with torch.no_grad():
            dh, partials = add_rmsnorm_bwd(gy, gh, h, packed, exp, ctx.eps, ctx.group_size)
        grad_gain = partials.sum(0, keepdim=True).to(ctx.probe_dtype) if needs[4] else None
        return dh if needs[0] else None, dh if needs[1] else None, None, None, grad_gain, None, None


def ternary_add_rmsnorm(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor,
                        probe: torch.Tensor | None, eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (h = x + r, rmsnorm(h)) over the last dim, fused where x and r share shape and dtype (else
    the add in torch, then :func:`ternary_rmsnorm`). ``probe`` ([1, D] or None) receives dL/dgain."""
    if x.shape != r.shape or x.dtype != r.dtype:
        h = x + r
        return h, ternary_rmsnorm(h, packed, exp, probe, eps, group_size)
    check_norm_args(x, packed, exp, probe, group_size)
    return _TernaryAddRMSNorm.apply(x, r, packed, exp, probe, eps, group_size)
