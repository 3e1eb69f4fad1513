"""Ternary linear: ``y = x @ W.T`` with ``W = T * 2**E`` decoded tile by tile inside the kernel.

Ops: ``arbfn::linear_fwd`` (x [..., K] -> y [..., N]) and ``arbfn::linear_bwd_x`` (dL/dy -> dL/dx).
The weight-gradient signal ``dL/dW = g.T @ x`` reaches the update through the zero *probe*
argument of :func:`ternary_linear` (see kernels/__init__.py); it is one dense matmul (cuBLAS on GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable, decode_tile, inv_pow3
from kernels._vmap import activation_vmap_rule
from kernels.packing import decode_reference, n_groups, packed_width

# ---------------------------------------------------------------- references


def linear_fwd_reference(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Pure-torch forward in fp32 accumulation; output in x's dtype."""
    w = decode_reference(packed, exp, k, group_size)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def linear_bwd_x_reference(g: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Pure-torch ``dL/dx = g @ W``; output in g's dtype."""
    w = decode_reference(packed, exp, k, group_size)
    return (g.to(torch.float32) @ w).to(g.dtype)


# ---------------------------------------------------------------- Triton kernels


@triton.jit(do_not_specialize=["M", "N", "K", "KB", "G"])  # sizes vary per call: one compile, not one per size
def _linear_fwd_kernel(x_ptr, packed_ptr, exp_ptr, y_ptr, M, N, K, KB, G, GS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = decode_tile(packed_ptr, exp_ptr, rn, rk, rn < N, K, KB, G, GS)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["M", "N", "K", "KB", "G"])  # sizes vary per call: one compile, not one per size
def _linear_bwd_x_kernel(g_ptr, packed_ptr, exp_ptr, out_ptr, M, N, K, KB, G, GS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = decode_tile(packed_ptr, exp_ptr, rn, rk, rn < N, K, KB, G, GS)
        acc += tl.dot(g, w.to(g.dtype))
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit(do_not_specialize=["N", "K", "KB", "G"])
def _linear_gemv_kernel(x_ptr, packed_ptr, exp_ptr, y_ptr, N, K, KB, G, GS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Few-row forward (decode): one program per (row block, input row); walks packed *bytes*, so every byte
    is read once and its five digits come out with constant divisors instead of a per-column division."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    for b0 in range(0, KB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mask = (rn[:, None] < N) & (rb[None, :] < KB)
        byte = tl.load(packed_ptr + rn[:, None] * KB + rb[None, :], mask=mask, other=121).to(tl.int32)
        for d in tl.static_range(5):
            col = rb * 5 + d
            x = tl.load(x_ptr + m * K + col, mask=col < K, other=0.0).to(tl.float32)
            e = tl.load(exp_ptr + rn[:, None] * G + (col // GS)[None, :], mask=mask & (col[None, :] < K), other=0)
            trit = ((byte * inv_pow3(d)) >> 16) % 3 - 1
            acc += trit.to(tl.float32) * tl.exp2(e.to(tl.float32)) * x[None, :]
    tl.store(y_ptr + m * N + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rn < N)


GEMV_MAX_M = 4  # up to this many input rows the byte-walking GEMV kernel beats padding M to a tensor-core tile


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 64


def linear_fwd_triton(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Launch the forward kernel; x [..., K] -> [..., N]."""
    check_launchable(x, packed, exp)
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if y.numel() and m <= GEMV_MAX_M:
        _linear_gemv_kernel[(cdiv(n, 32), m)](x2, packed.contiguous(), exp.contiguous(), y, n, k, packed_width(k),
                                              n_groups(k, group_size), GS=group_size, BLOCK_N=32, BLOCK_B=64)
    elif y.numel():
        bm = _block_m(m)
        _linear_fwd_kernel[(cdiv(m, bm), cdiv(n, 64))](
            x2, packed.contiguous(), exp.contiguous(), y, m, n, k, packed_width(k), n_groups(k, group_size),
            GS=group_size, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64)
    return y.reshape(*x.shape[:-1], n)


def linear_bwd_x_triton(g: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Launch the input-gradient kernel; g [..., N] -> [..., K]."""
    check_launchable(g, packed, exp)
    n = packed.shape[0]
    g2 = g.reshape(-1, n).contiguous()
    m = g2.shape[0]
    out = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if out.numel():
        bm = _block_m(m)
        _linear_bwd_x_kernel[(cdiv(m, bm), cdiv(k, 64))](
            g2, packed.contiguous(), exp.contiguous(), out, m, n, k, packed_width(k), n_groups(k, group_size),
            GS=group_size, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64)
    return out.reshape(*g.shape[:-1], k)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``x @ (T * 2**E).T`` for x [..., k]."""
    return linear_fwd_reference(x, packed, exp, k, group_size)


@linear_fwd.register_kernel("cuda")
def _(x, packed, exp, k, group_size):
    return linear_fwd_triton(x, packed, exp, k, group_size)


@linear_fwd.register_fake
def _(x, packed, exp, k, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("arbfn::linear_bwd_x", mutates_args=())
def linear_bwd_x(g: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``g @ (T * 2**E)`` for g [..., N]: the gradient for the linear's input."""
    return linear_bwd_x_reference(g, packed, exp, k, group_size)


@linear_bwd_x.register_kernel("cuda")
def _(g, packed, exp, k, group_size):
    return linear_bwd_x_triton(g, packed, exp, k, group_size)


@linear_bwd_x.register_fake
def _(g, packed, exp, k, group_size):
    return g.new_empty((*g.shape[:-1], k))


torch.library.register_vmap("arbfn::linear_fwd", activation_vmap_rule(linear_fwd))
torch.library.register_vmap("arbfn::linear_bwd_x", activation_vmap_rule(linear_bwd_x))


# ---------------------------------------------------------------- autograd


class _TernaryLinear(torch.autograd.Function):
    """Split-style Function: forward/backward call only ops, so grad, vmap, compile and export see through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, packed, exp, probe, k, group_size):
        return linear_fwd(x, packed, exp, k, group_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, packed, exp, probe, k, group_size = inputs
        ctx.save_for_backward(x, packed, exp)
        ctx.k, ctx.group_size = k, group_size
        ctx.probe_dtype = probe.dtype if probe is not None else None

    @staticmethod
    def backward(ctx, g):
        x, packed, exp = ctx.saved_tensors
        with torch.no_grad():
            return _linear_backward(ctx, g, x, packed, exp)


def _linear_backward(ctx, g, x, packed, exp):
    grad_x = linear_bwd_x(g, packed, exp, ctx.k, ctx.group_size) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[3]:
        grad_w = (g.reshape(-1, g.shape[-1]).transpose(0, 1) @ x.reshape(-1, ctx.k)).to(ctx.probe_dtype)
    return grad_x, None, None, grad_w, None, None


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, probe: torch.Tensor | None,
                   k: int, group_size: int) -> torch.Tensor:
    """Differentiable ternary linear. ``probe`` ([N, k] zeros, usually an expanded 0-stride tensor, or None)
    receives ``dL/dW`` as its gradient; its values are ignored by the forward."""
    return _TernaryLinear.apply(x, packed, exp, probe, k, group_size)
