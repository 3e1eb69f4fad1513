"""Ternary RMSNorm: ``y = x * rsqrt(mean(x**2) + eps) * gain`` with ``gain = T * 2**E`` decoded in the kernel.

Ops: ``arbfn::rmsnorm_fwd`` (x [..., D] -> y [..., D], fp32 math, x's dtype) and ``arbfn::rmsnorm_bwd``
(dL/dy -> (dL/dx [..., D], dL/dgain [1, D] fp32 summed over all rows)). The gain is a [1, D] ternary
weight; its gradient reaches the update through the probe of :func:`ternary_rmsnorm`. The Triton
kernels hold a block of whole rows per program (``BLOCK_D`` = next power of two >= D, D <= 8192). With
``ADD`` set they also serve kernels/add_rmsnorm.py, which fuses the residual add before the norm into them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable, decode_tile
from kernels._vmap import activation_vmap_rule, per_sample
from kernels.packing import decode_reference, n_groups, packed_width

MAX_TRITON_DIM = 8192
BWD_PROGRAMS = 256
"""At most this many backward programs (each loops over whole row blocks): their dL/dgain partials are summed
by one torch reduction (7.5 us for the 256 partials of a [4096, 512] gradient on an H200, 11.5 us for 512)."""

# ---------------------------------------------------------------- references


def _gain(packed: torch.Tensor, exp: torch.Tensor, d: int, group_size: int) -> torch.Tensor:
    return decode_reference(packed, exp, d, group_size)[0]


def rmsnorm_fwd_reference(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float, group_size: int
                          ) -> torch.Tensor:
    """Pure-torch forward in fp32; output in x's dtype."""
    xf = x.to(torch.float32)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * r * _gain(packed, exp, x.shape[-1], group_size)).to(x.dtype)


def rmsnorm_bwd_terms(g: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx fp32, per-row dL/dgain terms ``g * xhat`` [rows, D] fp32): the backward before its casts and sums."""
    d = x.shape[-1]
    xf, gf = x.to(torch.float32), g.to(torch.float32)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xhat = xf * r
    gg = gf * _gain(packed, exp, d, group_size)
    return r * (gg - xhat * (gg * xhat).mean(-1, keepdim=True)), (gf * xhat).reshape(-1, d)


def rmsnorm_bwd_reference(g: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                          group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch (dL/dx in x's dtype, dL/dgain [1, D] fp32): ``dx = r * (g*gain - xhat * mean(g*gain*xhat))``."""
    grad_x, terms = rmsnorm_bwd_terms(g, x, packed, exp, eps, group_size)
    return grad_x.to(x.dtype), terms.sum(0, keepdim=True)


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _gain_row(packed_ptr, exp_ptr, cols, D, KB, G, GS: tl.constexpr):
    """The decoded gain as a [1, BLOCK_D] fp32 tile (zero past D)."""
    row = tl.zeros((1,), tl.int32)
    return decode_tile(packed_ptr, exp_ptr, row, cols, row == 0, D, KB, G, GS)


@triton.jit(do_not_specialize=["M", "D", "KB", "G"])  # sizes vary per call: one compile per BLOCK_D
def _rmsnorm_fwd_kernel(x_ptr, r_ptr, h_ptr, packed_ptr, exp_ptr, y_ptr, M, D, KB, G, eps, GS: tl.constexpr,
                        ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = rmsnorm(x); with ``ADD``, h = x + r rounded to h's dtype is stored and normalised instead."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        h = (x + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        x = h.to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * r[:, None] * _gain_row(packed_ptr, exp_ptr, cols, D, KB, G, GS)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "D", "KB", "G", "BLOCKS"])  # sizes vary per call: one compile per BLOCK_D
def _rmsnorm_bwd_kernel(g_ptr, gh_ptr, x_ptr, packed_ptr, exp_ptr, dx_ptr, dgain_ptr, M, D, KB, G, eps, BLOCKS,
                        GS: tl.constexpr, ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dx per row over ``BLOCKS`` consecutive row blocks (with ``ADD``, plus the residual gradient ``gh``);
    this program's partial dL/dgain (a sum over its rows, in row order) into row ``pid`` of ``dgain``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    gain = _gain_row(packed_ptr, exp_ptr, cols, D, KB, G, GS)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for b in range(BLOCKS):
        rows = (pid * BLOCKS + b) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * r[:, None]
        gg = g * gain
        dx = r[:, None] * (gg - xhat * (tl.sum(gg * xhat, axis=1) / D)[:, None])
        if ADD:
            dx += tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(g * xhat, axis=0)
    tl.store(dgain_ptr + pid * D + cols, acc, mask=cols < D)


def tile_shape(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): whole rows per program, about 4096 elements per tile."""
    if d > MAX_TRITON_DIM:
        raise ValueError(f"the Triton RMSNorm kernels handle D <= {MAX_TRITON_DIM}, got D = {d}")
    block_d = triton.next_power_of_2(d)
    return max(1, min(16, 4096 // block_d)), block_d


def bwd_programs(m: int, d: int) -> tuple[int, int]:
    """(programs, row blocks each) of the backward kernel over ``m`` rows of ``d``: at most BWD_PROGRAMS programs,
    at least one. Program i sums the dL/dgain terms of rows [i * blocks * BLOCK_R, (i + 1) * blocks * BLOCK_R)."""
    row_blocks = cdiv(m, tile_shape(d)[0])
    blocks = max(1, cdiv(row_blocks, BWD_PROGRAMS))
    return max(1, cdiv(row_blocks, blocks)), blocks


def _launch_fwd(x: torch.Tensor, r: torch.Tensor | None, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) as [rows, D]: h = x + r (x itself when r is None), y = rmsnorm(h)."""
    check_launchable(x, packed, exp, *([] if r is None else [r]))
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    r2 = x2 if r is None else r.reshape(-1, d).contiguous()
    h = x2 if r is None else torch.empty_like(x2)
    y = torch.empty_like(x2)
    if y.numel():
        br, bd = tile_shape(d)
        _rmsnorm_fwd_kernel[(cdiv(x2.shape[0], br),)](x2, r2, h, packed.contiguous(), exp.contiguous(), y, x2.shape[0],
                                                       d, packed_width(d), n_groups(d, group_size), eps,
                                                       GS=group_size, ADD=r is not None, BLOCK_R=br, BLOCK_D=bd)
    return h, y


def _launch_bwd(g: torch.Tensor, gh: torch.Tensor | None, x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor,
                eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx [rows, D] plus ``gh`` where given, dL/dgain partials [programs, D] fp32)."""
    check_launchable(g, x, packed, exp, *([] if gh is None else [gh]))
    d = x.shape[-1]
    x2, g2 = x.reshape(-1, d).contiguous(), g.reshape(-1, d).contiguous()
    gh2 = g2 if gh is None else gh.reshape(-1, d).contiguous()
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    programs, blocks = bwd_programs(m, d)
    if not x2.numel():
        return (dx if gh is None else gh2.clone()), torch.zeros((programs, d), dtype=torch.float32, device=x.device)
    br, bd = tile_shape(d)
    partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](g2, gh2, x2, packed.contiguous(), exp.contiguous(), dx, partial, m, d,
                                     packed_width(d), n_groups(d, group_size), eps, blocks, GS=group_size,
                                     ADD=gh is not None, BLOCK_R=br, BLOCK_D=bd)
    return dx, partial


def rmsnorm_fwd_triton(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float, group_size: int
                       ) -> torch.Tensor:
    """Launch the forward kernel; x [..., D] -> [..., D] in x's dtype."""
    return _launch_fwd(x, None, packed, exp, eps, group_size)[1].reshape(x.shape)


def rmsnorm_bwd_triton(g: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; per-program gain partials are summed here (deterministic)."""
    dx, partial = _launch_bwd(g, None, x, packed, exp, eps, group_size)
    return dx.reshape(x.shape), partial.sum(0, keepdim=True)


def add_rmsnorm_fwd_triton(x: torch.Tensor, r: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                           group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel with the residual add: (h = x + r, rmsnorm(h)), both [..., D] in x's dtype."""
    h, y = _launch_fwd(x, r, packed, exp, eps, group_size)
    return h.reshape(x.shape), y.reshape(x.shape)


def add_rmsnorm_bwd_triton(g: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, packed: torch.Tensor,
                           exp: torch.Tensor, eps: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel with the residual gradient: (gh + dL/dh through the norm, gain partials)."""
    dh, partial = _launch_bwd(g, gh, h, packed, exp, eps, group_size)
    return dh.reshape(h.shape), partial


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float, group_size: int
                ) -> torch.Tensor:
    """``x * rsqrt(mean(x**2) + eps) * (T * 2**E)`` over the last dim."""
    return rmsnorm_fwd_reference(x, packed, exp, eps, group_size)


@rmsnorm_fwd.register_kernel("cuda")
def _(x, packed, exp, eps, group_size):
    return rmsnorm_fwd_triton(x, packed, exp, eps, group_size)


@rmsnorm_fwd.register_fake
def _(x, packed, exp, eps, group_size):
    return torch.empty_like(x)


@torch.library.custom_op("arbfn::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(g: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, eps: float,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dgain [1, D] fp32 summed over all rows) for upstream gradient ``g``."""
    return rmsnorm_bwd_reference(g, x, packed, exp, eps, group_size)


@rmsnorm_bwd.register_kernel("cuda")
def _(g, x, packed, exp, eps, group_size):
    return rmsnorm_bwd_triton(g, x, packed, exp, eps, group_size)


@rmsnorm_bwd.register_fake
def _(g, x, packed, exp, eps, group_size):
    return torch.empty_like(x), x.new_empty((1, x.shape[-1]), dtype=torch.float32)


def _bwd_vmap_rule(info, in_dims, g, x, packed, exp, eps, group_size):
    """One launch per sample: each sample needs its own dL/dgain sum (per-sample gradients)."""
    args = (g, x, packed, exp)
    outs = per_sample(lambda *a: rmsnorm_bwd(*a, eps, group_size), info.batch_size, in_dims[:4], args)
    return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


torch.library.register_vmap("arbfn::rmsnorm_fwd", activation_vmap_rule(rmsnorm_fwd))
torch.library.register_vmap("arbfn::rmsnorm_bwd", _bwd_vmap_rule)


# ---------------------------------------------------------------- autograd


class _TernaryRMSNorm(torch.autograd.Function):
    """Split-style Function: forward/backward call only ops (see kernels/__init__.py)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, packed, exp, probe, eps, group_size):
        return rmsnorm_fwd(x, packed, exp, eps, group_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, packed, exp, probe, eps, group_size = inputs
        ctx.save_for_backward(x, packed, exp)
        ctx.eps, ctx.group_size = eps, group_size
        ctx.probe_dtype = probe.dtype if probe is not None else None

    @staticmethod
    def backward(ctx, g):
        x, packed, exp = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            return None, None, None, None, None, None
        with torch.no_grad():
            grad_x, grad_gain = rmsnorm_bwd(g, x, packed, exp, ctx.eps, ctx.group_size)
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        grad_gain = grad_gain.to(ctx.probe_dtype) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_gain, None, None


def check_norm_args(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, probe: torch.Tensor | None,
                    group_size: int) -> None:
    """Raise unless the gain's packed [1, ceil(D/5)], exp [1, G] and probe [1, D] fit x [..., D] of a float dtype."""
    d = x.shape[-1]
    if packed.dim() != 2 or tuple(packed.shape) != (1, packed_width(d)):
        raise ValueError(f"RMSNorm gain for D = {d} needs packed [1, {packed_width(d)}], got {tuple(packed.shape)}")
    if exp.dim() != 2 or tuple(exp.shape) != (1, n_groups(d, group_size)):
        raise ValueError(f"RMSNorm gain for D = {d} needs exp [1, {n_groups(d, group_size)}], got {tuple(exp.shape)}")
    if probe is not None and tuple(probe.shape) != (1, d):
        raise ValueError(f"RMSNorm probe must be [1, {d}], got {tuple(probe.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"RMSNorm needs a floating-point input, got {x.dtype}")


def ternary_rmsnorm(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, probe: torch.Tensor | None,
                    eps: float, group_size: int) -> torch.Tensor:
    """Differentiable ternary RMSNorm over the last dim of ``x``. ``probe`` ([1, D] zeros or None; its values
    are ignored) receives ``dL/dgain`` as its gradient."""
    check_norm_args(x, packed, exp, probe, group_size)
    return _TernaryRMSNorm.apply(x, packed, exp, probe, eps, group_size)
