"""Ternary linear: ``y = x @ W.T`` with ``W = T * 2**E`` from packed trits and int8 group exponents.

On CUDA, up to ``GEMV_MAX_M`` input rows run a GEMV that reads only the packed bytes (split over K): the
lookup-table GEMV of kernels/gemv_lut.py for group sizes up to 36, else the grouped GEMV below; more rows
decode W once per call into a transient dense tile (a Triton kernel) and run one matmul, since tensor-core
GEMMs beat any decode-in-the-loop kernel there (benchmarks/RESULTS.md has both measured).

Ops: ``arbfn::linear_fwd`` (x [..., K] -> y [..., N]) and ``arbfn::linear_bwd_x`` (dL/dy -> dL/dx).
The weight-gradient signal ``dL/dW = g.T @ x`` reaches the update through the zero *probe*
argument of :func:`ternary_linear` (see kernels/__init__.py); it is one dense matmul (cuBLAS on GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import gemv_lut
from kernels._triton import autotuned, cdiv, check_launchable, decode_octets, floor_div_pow3, octet_columns, pow2_exact
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


_DECODE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w)
                   for bn, bt, w in ((4, 128, 4), (8, 32, 2), (2, 256, 4), (8, 64, 4), (16, 32, 4), (1, 256, 4))]


@autotuned(_DECODE_CONFIGS, key=["N", "K", "GS"])
@triton.jit(do_not_specialize=["N", "KB", "G"])  # only K's divisibility matters (the stores' row stride)
def _decode_kernel(packed_ptr, exp_ptr, w_ptr, N, K, KB, G, GS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """W[rows, cols] = T * 2**E into a dense tile of BLOCK_T octets (8 columns, one 16-byte bf16 store) per row."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    octets = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    w = decode_octets(packed_ptr, exp_ptr, rn, octets, rn < N, K, KB, G, GS)
    cols = octet_columns(octets)
    tl.store(w_ptr + rn[:, None, None] * K + cols, w.to(w_ptr.dtype.element_ty),
             mask=(rn < N)[:, None, None] & (cols < K))


# The GEMV's tuning space: rows per program, groups per iteration, warps, and how many of the four high base-3
# digits take the float pipe (the others take the integer pipe): which balance is fastest depends on the GPU.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_G": bg, "FLOAT_DIGITS": fd}, num_warps=w)
                 for bn, bg, w in ((64, 2, 4), (32, 4, 4), (32, 8, 8), (16, 16, 8), (64, 8, 8), (128, 4, 8))
                 for fd in (0, 2)]
@triton.jit
def _gemv_block(g, g_end, slot, K, GS: tl.constexpr):
    """Where groups ``g`` (masked at ``g_end``) lie: first and past-last column per group, the byte of each
    (group, slot), and which (group, slot) entries hold a column of their group."""
    col_lo = g * GS
    col_hi = tl.minimum(col_lo + GS, K)
    byte_i = (col_lo // 5)[:, None] + slot[None, :]
    entry = (g < g_end)[:, None] & (byte_i * 5 < col_hi[:, None])
    return col_lo, col_hi, byte_i, entry


@triton.jit
def _gemv_block_loads(packed_ptr, exp_ptr, rn, row_ok, g, g_end, slot, K, KB, G, GS: tl.constexpr):
    """The GEMV's loads for groups ``g`` (masked at ``g_end``): bytes [rows, groups, slots] (121 = zero trits
    where masked) and exponents [rows, groups]."""
    _, _, byte_i, entry = _gemv_block(g, g_end, slot, K, GS)
    b = tl.load(packed_ptr + rn[:, None, None] * KB + byte_i[None, :, :], mask=row_ok[:, None, None] & entry[None],
                other=121)
    e = tl.load(exp_ptr + rn[:, None] * G + g[None, :], mask=row_ok[:, None] & (g < g_end)[None, :], other=0)
    return b, e


@autotuned(_GEMV_CONFIGS, key=["N", "K", "GS"])
@triton.jit(do_not_specialize=["N", "K", "KB", "G", "SPLIT_G"])  # byte gathers: no alignment to gain
def _linear_gemv_kernel(x_ptr, out_ptr, packed_ptr, exp_ptr, N, K, KB, G, SPLIT_G, GS: tl.constexpr,
                        SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                        FLOAT_DIGITS: tl.constexpr):
    """Few-row forward: program (row block, K split, input row m) writes ``Σ_k W[n, k] x[m, k]`` over its
    ``SPLIT_G`` groups into ``out[m, split, n]`` (fp32 partials, or the output itself with one split).

    It walks whole groups: group g's bytes fill ``SLOTS`` slots (a byte that straddles two groups sits in
    both, its columns masked to the group), so ``2**E`` multiplies once per (row, group), not per element.
    Each byte's trits come from exact floats ``floor(b / 3**d)`` (see :func:`kernels._triton.floor_div_pow3`), no division,
    no int-to-float conversion; ``FLOAT_DIGITS`` of the four high digits take the float pipe, the rest the
    integer pipe, so the tuner can balance the two units."""
    pid_s, m = tl.program_id(1), tl.program_id(2)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    gi = tl.arange(0, BLOCK_G)
    slot = tl.arange(0, SLOTS)
    acc = tl.zeros((BLOCK_N, BLOCK_G, SLOTS), tl.float32)
    g_start = pid_s * SPLIT_G
    g_end = min(G, g_start + SPLIT_G)
    b_next, e_next = _gemv_block_loads(packed_ptr, exp_ptr, rn, row_ok, g_start + gi, g_end, slot, K, KB, G, GS)
    for g0 in range(g_start, g_end, BLOCK_G):
        # the next block's bytes and exponents are in flight while this block computes (register double buffer)
        b, e = b_next, e_next
        b_next, e_next = _gemv_block_loads(packed_ptr, exp_ptr, rn, row_ok, g0 + BLOCK_G + gi, g_end, slot, K, KB,
                                           G, GS)
        col_lo, col_hi, byte_i, entry = _gemv_block(g0 + gi, g_end, slot, K, GS)  # byte_i, entry: [BLOCK_G, SLOTS]
        b = b.to(tl.int32)
        bf = (b | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        val = tl.zeros((BLOCK_N, BLOCK_G, SLOTS), tl.float32)
        f_above = tl.zeros((BLOCK_N, BLOCK_G, SLOTS), tl.float32)
        for d in tl.static_range(4, -1, -1):  # high digit first: each trit needs the floor above it
            col = byte_i * 5 + d
            x = tl.load(x_ptr + m * K + col, mask=entry & (col >= col_lo[:, None]) & (col < col_hi[:, None]),
                        other=0.0).to(tl.float32)
            f = floor_div_pow3(b, bf, d, d > 4 - FLOAT_DIGITS)
            val += (f - (f_above * 3.0 + 1.0)) * x[None, :, :]  # trit d = floor(b/3**d) - 3 floor(b/3**(d+1)) - 1
            f_above = f
        acc += pow2_exact(e.to(tl.int32))[:, :, None] * val
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + (m * tl.num_programs(1) + pid_s) * N + rn, total.to(out_ptr.dtype.element_ty), mask=row_ok)


GEMV_MAX_M = 2  # up to this many input rows a GEMV beats decode + cuBLAS (RESULTS.md); gemv_lut.MAX_ROWS matches it
GEMV_ROWS_X_SPLITS = 65536  # the K split: enough (row, split) pairs that a few-row GEMV fills the GPU
GEMV_MIN_SPLIT_COLUMNS = 256  # ... but no split narrower than this (each program's fixed costs)


def gemv_slots(group_size: int) -> int:
    """Slots per group in the GEMV: the most bytes one group's columns touch, to a power of two."""
    return triton.next_power_of_2((group_size - 1) // 5 + 2)


def gemv_splits(n: int, g: int, group_size: int) -> int:
    """How many K ranges the GEMV splits a row into: enough (row, range) pairs to fill the GPU, each range at
    least ``GEMV_MIN_SPLIT_COLUMNS`` wide (1: the kernel writes the output directly, one launch)."""
    return max(1, min(cdiv(g, cdiv(GEMV_MIN_SPLIT_COLUMNS, group_size)), cdiv(GEMV_ROWS_X_SPLITS, n)))


def decode_triton(packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``T * 2**E`` [N, k] in ``dtype`` (exact: every value is a power of two or zero)."""
    check_launchable(packed, exp)
    n = packed.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    if w.numel():
        grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(k, 8 * meta["BLOCK_T"]))
        _decode_kernel[grid](packed.contiguous(), exp.contiguous(), w, n, k, packed_width(k),
                             n_groups(k, group_size), GS=group_size)
    return w


def _gemv(x2: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Few-row forward: the lookup-table GEMV (kernels/gemv_lut.py) where the group size fits it, else the
    grouped GEMV; both over about ``gemv_splits`` K ranges (the table GEMV's are whole chunks of groups)."""
    m, n, g = x2.shape[0], packed.shape[0], n_groups(k, group_size)
    split = gemv_splits(n, g, group_size)
    if gemv_lut.fits(group_size):
        return gemv_lut.gemv_lut(x2, packed.contiguous(), exp.contiguous(), k, group_size, split)
    out = torch.empty((m, split, n), dtype=torch.float32 if split > 1 else x2.dtype, device=x2.device)
    grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), split, m)
    _linear_gemv_kernel[grid](x2, out, packed.contiguous(), exp.contiguous(), n, k, packed_width(k), g,
                              cdiv(g, split), GS=group_size, SLOTS=gemv_slots(group_size))
    return out.sum(1).to(x2.dtype) if split > 1 else out.reshape(m, n)


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
    receives ``dL/dW`` as its gradient; its values are ignored by the forward.

    The Function sees x as [rows, k]: saved 3-D and reshaped in its backward, x made Inductor write the
    producing kernel's output twice (once for the op, once for the saved view; the MLP's GELU took 2x the
    float twin's)."""
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"ternary_linear expects x [..., {k}], got shape {tuple(x.shape)}")
    y = _TernaryLinear.apply(x.reshape(-1, k), packed, exp, probe, k, group_size)
    return y.reshape(*x.shape[:-1], y.shape[-1])
