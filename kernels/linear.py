"""Ternary linear: ``y = x @ W.T`` with ``W = T * 2**E`` from packed trits and int8 group exponents.

On CUDA, up to ``GEMV_MAX_M`` input rows run a GEMV kernel that reads only the packed bytes (split over K);
more rows decode W once per call into a transient dense tile (a Triton kernel) and run one matmul, since
tensor-core GEMMs beat any decode-in-the-loop kernel there (benchmarks/RESULTS.md has both measured).

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


@triton.jit(do_not_specialize=["N", "K", "KB", "G"])  # sizes vary per call: one compile, not one per size
def _decode_kernel(packed_ptr, exp_ptr, w_ptr, N, K, KB, G, GS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = decode_tile(packed_ptr, exp_ptr, rn, rk, rn < N, K, KB, G, GS)
    tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (rk[None, :] < K))


@triton.jit(do_not_specialize=["N", "K", "KB", "G", "SPLIT_B"])
def _linear_gemv_kernel(x_ptr, packed_ptr, exp_ptr, part_ptr, N, K, KB, G, SPLIT_B, GS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Few-row forward (decode): program (row block, K split, input row) walks its ``SPLIT_B`` packed bytes
    once, takes their five digits with constant divisors, and writes an fp32 partial sum per output row."""
    pid_s, m = tl.program_id(1), tl.program_id(2)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    for b0 in range(pid_s * SPLIT_B, min(KB, pid_s * SPLIT_B + SPLIT_B), BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mask = (rn[:, None] < N) & (rb[None, :] < KB)
        byte = tl.load(packed_ptr + rn[:, None] * KB + rb[None, :], mask=mask, other=121).to(tl.int32)
        for d in tl.static_range(5):
            col = rb * 5 + d
            x = tl.load(x_ptr + m * K + col, mask=col < K, other=0.0).to(tl.float32)
            e = tl.load(exp_ptr + rn[:, None] * G + (col // GS)[None, :], mask=mask & (col[None, :] < K), other=0)
            trit = ((byte * inv_pow3(d)) >> 16) % 3 - 1
            acc += trit.to(tl.float32) * tl.exp2(e.to(tl.float32)) * x[None, :]
    n_split = tl.num_programs(1)
    tl.store(part_ptr + (m * n_split + pid_s) * N + rn, tl.sum(acc, axis=1), mask=rn < N)


GEMV_MAX_M = 4  # up to this many input rows the GEMV kernel reads only the packed bytes; above, decode + cuBLAS
GEMV_BLOCK_N, GEMV_BLOCK_B, GEMV_SPLIT_B = 16, 64, 256  # a K split of 256 bytes (1280 columns) per program


def decode_triton(packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``T * 2**E`` [N, k] in ``dtype`` (exact: every value is a power of two or zero)."""
    check_launchable(packed, exp)
    n = packed.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    if w.numel():
        _decode_kernel[(cdiv(n, 32), cdiv(k, 128))](packed.contiguous(), exp.contiguous(), w, n, k, packed_width(k),
                                                   n_groups(k, group_size), GS=group_size, BLOCK_N=32, BLOCK_K=128)
    return w


def _gemv(x2: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    m, n, kb = x2.shape[0], packed.shape[0], packed_width(k)
    split = cdiv(kb, GEMV_SPLIT_B)
    part = torch.empty((m, split, n), dtype=torch.float32, device=x2.device)
    _linear_gemv_kernel[(cdiv(n, GEMV_BLOCK_N), split, m)](
        x2, packed.contiguous(), exp.contiguous(), part, n, k, kb, n_groups(k, group_size), GEMV_SPLIT_B,
        GS=group_size, BLOCK_N=GEMV_BLOCK_N, BLOCK_B=GEMV_BLOCK_B)
    return part.sum(1).to(x2.dtype)


def linear_fwd_triton(x: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """x [..., K] -> [..., N]: the packed-byte GEMV for a few rows, else a transient decode of W and one matmul
    (cuBLAS on GPU, fp32 accumulation); the packed weight is all that persists."""
    check_launchable(x, packed, exp)
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], packed.shape[0]
    if m * n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    y = _gemv(x2, packed, exp, k, group_size) if m <= GEMV_MAX_M else x2 @ decode_triton(packed, exp, k, group_size, x.dtype).T
    return y.reshape(*x.shape[:-1], n)


def linear_bwd_x_triton(g: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """g [..., N] -> dL/dx [..., K] = g @ W, with W decoded transiently by the Triton kernel."""
    check_launchable(g, packed, exp)
    n = packed.shape[0]
    g2 = g.reshape(-1, n)
    return (g2 @ decode_triton(packed, exp, k, group_size, g.dtype)).reshape(*g.shape[:-1], k)


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
