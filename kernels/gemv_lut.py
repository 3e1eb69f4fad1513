"""Few-row ternary GEMV through a per-call lookup table: ``y[m] = x[m] @ W.T`` for the M <= 2 decode path.

A packed byte holds 5 trits, so it takes one of 243 values. For each input row m, group g and byte slot s
(the s-th byte that group g's columns touch), the table holds, for every byte value v,
``table[m, g, s, v] = Σ_d trit_d(v) · x[m, 5·(g·GS//5 + s) + d] · 2**-c[m, g]`` over the digits d whose column
lies in group g. ``2**c[m, g]`` is the power of two at or below the group's largest |x|, so entries stay below
10 in magnitude: fp16 entries for bf16 or fp16 inputs (512 B per (input row, group, slot): 1 MiB for one row of
K = 8192 at group size 32), fp32 entries, exact up to fp32 rounding, for fp32 inputs. The GEMV then costs one
byte extraction, one table load and one add per (row, slot), and the scales once per (row, group):
``y[m, n] = Σ_g 2**E[n, g] · 2**c[m, g] · Σ_s table[m, g, s, byte(n, g, s)]``.

Lanes span weight rows, so a warp's 32 lookups at one (g, s) fall in one table (a few L1 lines). Each lane
walks its row in chunks of whole groups that are also whole bytes (5 groups, 32 bytes at group size 32): it
loads a chunk's bytes and exponents as aligned 8-byte words, and every byte's group and slot is a compile-time
constant. Both input rows of M = 2 share one pass over the weight. A group may touch at most 8 bytes
(:func:`fits`: group sizes up to 36); other group sizes use the grouped GEMV in kernels/linear.py.

Measured against that GEMV and bf16 cuBLAS in benchmarks/RESULTS.md (M = 1 on an H200).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._triton import autotuned, cdiv, pow2_exact, trit_of
from kernels.packing import n_groups, packed_width

MAX_SLOTS = 8  # bytes a group may touch: bounds a chunk's unrolled lookups (5 groups of 8 slots) and the table
TABLE_WIDTH = 256  # entries per (group, slot): the 243 byte values, padded to a power of two (the rest 0)
MAX_ROWS = 2  # input rows one pass over the weight serves (a power of two: they form a tile dimension)


def slots(group_size: int) -> int:
    """The most bytes one group's columns can touch (a group starting on a byte's last digit)."""
    return (group_size + 3) // 5 + 1


def fits(group_size: int) -> bool:
    """Whether the table GEMV handles this group size (each group touches at most MAX_SLOTS bytes)."""
    return slots(group_size) <= MAX_SLOTS


def chunk_shape(group_size: int) -> tuple[int, int]:
    """(groups, bytes) of the shortest run of whole groups that is also whole bytes: a GEMV step."""
    groups = 5 // math.gcd(group_size, 5)
    return groups, groups * group_size // 5


_TABLE_BLOCK = 8  # groups per table program


@triton.jit(do_not_specialize=["K", "G"])
def _table_kernel(x_ptr, table_ptr, scale_ptr, K, G, GS: tl.constexpr, GS_P2: tl.constexpr, SL: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The entries of BLOCK groups of input row m = program_id(1), each group's x times 2**-c (c: the exponent of
    its largest |x|, clamped to -126..127), and 2**c per group in ``scale_ptr``; zero for byte values past 242
    and for digits outside the group or past K."""
    m = tl.program_id(1)
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = g < G
    col_lo = g * GS
    col_hi = tl.minimum(col_lo + GS, K)
    cols = col_lo[:, None] + tl.arange(0, GS_P2)[None, :]
    xg = tl.load(x_ptr + m * K + cols, mask=ok[:, None] & (cols < col_hi[:, None]), other=0.0).to(tl.float32)
    c = (tl.max(tl.abs(xg), axis=1).to(tl.int32, bitcast=True) >> 23) - 127
    c = tl.minimum(tl.maximum(c, -126), 127)
    down = ((127 - c) << 23).to(tl.float32, bitcast=True)  # 2**-c, a normal float for c in -126..127
    tl.store(scale_ptr + m * G + g, ((127 + c) << 23).to(tl.float32, bitcast=True), mask=ok)
    v = tl.arange(0, 256)
    for s in tl.static_range(SL):
        byte_i = col_lo // 5 + s
        entry = tl.zeros((BLOCK, 256), tl.float32)
        for d in tl.static_range(5):
            col = byte_i * 5 + d
            xd = tl.load(x_ptr + m * K + col, mask=ok & (col >= col_lo) & (col < col_hi), other=0.0).to(tl.float32)
            trit = tl.where(v < 243, trit_of(v, v * 0 + d), 0).to(tl.float32)
            entry += (xd * down)[:, None] * trit[None, :]
        tl.store(table_ptr + ((m * G + g) * SL + s)[:, None] * 256 + v[None, :],
                 entry.to(table_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _funnel(lo, hi, shift):
    """The 8 bytes of the 16-byte window ``hi:lo`` (uint64 words) from bit ``shift`` (0..56, a multiple of 8)."""
    return (lo >> shift) | ((hi << 1) << (63 - shift))


@triton.jit
def _chunk_byte(words, w, j: tl.constexpr, shift, ok, N_WORDS):
    """Byte j (a compile-time constant) of each lane's chunk, whose first byte is bit ``shift`` of word w: the
    loads of one word repeat across j and fold into one."""
    lo = tl.load(words + w + j // 8, mask=ok & (w + j // 8 < N_WORDS), other=0)
    hi = tl.load(words + w + j // 8 + 1, mask=ok & (w + j // 8 + 1 < N_WORDS), other=0)
    return ((_funnel(lo, hi, shift) >> (8 * (j % 8))) & 255).to(tl.int32)


_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((128, 4), (256, 8), (64, 2), (256, 4))]


@autotuned(_CONFIGS, key=["N", "K", "GS", "M"])
@triton.jit(do_not_specialize=["N", "K", "KB", "G", "SPLIT_C", "BASE_P", "BASE_E", "WORDS_P", "WORDS_E"])
def _gemv_kernel(table_ptr, scale_ptr, out_ptr, packed_ptr, exp_ptr, N, K, KB, G, SPLIT_C, BASE_P, BASE_E,
                 WORDS_P, WORDS_E, GS: tl.constexpr, SL: tl.constexpr, CH_G: tl.constexpr, CH_B: tl.constexpr,
                 M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, K split) writes, for all M input rows, ``Σ_g 2**E[n, g] 2**c[m, g] Σ_s table[m, g, s,
    byte]`` over its SPLIT_C chunks into ``out[m, split, n]`` (fp32 partials, or the output itself with one
    split). ``packed_ptr - BASE_P`` and ``exp_ptr - BASE_E`` are 8-byte aligned, and WORDS_P and WORDS_E words
    cover the two tensors. A lane's words may hold bytes of other rows or outside the tensors (never past an
    aligned word, so never past an allocation): those fall in slots past K, whose table entries are zero."""
    pid_s = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < N
    rows = tl.arange(0, M)
    words = (packed_ptr - BASE_P).to(tl.pointer_type(tl.uint64), bitcast=True)
    exp_words = (exp_ptr - BASE_E).to(tl.pointer_type(tl.uint64), bitcast=True)
    tables = table_ptr + rows[:, None] * (G * SL * 256)
    acc = tl.zeros((M, BLOCK_N), tl.float32)
    c_start = pid_s * SPLIT_C
    for c in range(c_start, tl.minimum(tl.cdiv(G, CH_G), c_start + SPLIT_C)):
        at = BASE_P + rn.to(tl.int64) * KB + c * CH_B  # the chunk's first byte, counted from the aligned base
        w = at >> 3
        shift = ((at & 7) * 8).to(tl.uint64)
        at_e = BASE_E + rn.to(tl.int64) * G + c * CH_G  # its first group's exponent
        w_e = at_e >> 3
        e_lo = tl.load(exp_words + w_e, mask=ok & (w_e < WORDS_E), other=0)
        e_hi = tl.load(exp_words + w_e + 1, mask=ok & (w_e + 1 < WORDS_E), other=0)
        exps = _funnel(e_lo, e_hi, ((at_e & 7) * 8).to(tl.uint64))
        for q in tl.static_range(CH_G):
            g = c * CH_G + q
            real = ok & (rn * 0 + g < G)  # the last chunk may run past the last group
            val = tl.zeros((M, BLOCK_N), tl.float32)
            for j in tl.static_range((q * GS) // 5, (q * GS + GS - 1) // 5 + 1):
                byte = _chunk_byte(words, w, j, shift, ok, WORDS_P)
                val += tl.load(tables + (g * SL + j - (q * GS) // 5) * 256 + byte[None, :], mask=real[None, :],
                               other=0.0).to(tl.float32)
            e = (((exps >> (8 * q)) & 255).to(tl.int32) ^ 128) - 128
            scale = tl.load(scale_ptr + rows * G + g, mask=rows * 0 + g < G, other=0.0)
            acc += pow2_exact(e)[None, :] * (val * scale[:, None])
    tl.store(out_ptr + (rows[:, None] * tl.num_programs(1) + pid_s) * N + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok[None, :])


def gemv_lut(x2: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int,
             splits: int) -> torch.Tensor:
    """``x2 @ W.T`` for x2 [M, k], M <= MAX_ROWS (contiguous CUDA tensors, or CPU under the interpreter) over
    up to ``splits`` K ranges of whole chunks; returns [M, N] in x2's dtype. Raises ValueError for a group size
    :func:`fits` rejects or more than MAX_ROWS input rows."""
    if not fits(group_size):
        raise ValueError(f"the table GEMV takes group sizes whose groups touch at most {MAX_SLOTS} bytes "
                         f"(up to 36), got {group_size}")
    if not 1 <= x2.shape[0] <= MAX_ROWS:
        raise ValueError(f"the table GEMV takes 1 to {MAX_ROWS} input rows, got {x2.shape[0]}")
    m, n, g = x2.shape[0], packed.shape[0], n_groups(k, group_size)
    sl = slots(group_size)
    entries = torch.float32 if x2.dtype == torch.float32 else torch.float16
    table = torch.empty((m, g, sl, TABLE_WIDTH), dtype=entries, device=x2.device)
    scale = torch.empty((m, g), dtype=torch.float32, device=x2.device)
    _table_kernel[(cdiv(g, _TABLE_BLOCK), m)](x2, table, scale, k, g, GS=group_size,
                                              GS_P2=triton.next_power_of_2(group_size), SL=sl, BLOCK=_TABLE_BLOCK)
    chunk_groups, chunk_bytes = chunk_shape(group_size)
    chunks = cdiv(g, chunk_groups)
    split_c = cdiv(chunks, splits)
    splits = cdiv(chunks, split_c)
    out = torch.empty((m, splits, n), dtype=torch.float32 if splits > 1 else x2.dtype, device=x2.device)
    base_p, base_e = packed.data_ptr() % 8, exp.data_ptr() % 8
    _gemv_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), splits)](
        table, scale, out, packed, exp, n, k, packed_width(k), g, split_c, base_p, base_e,
        cdiv(base_p + packed.numel(), 8), cdiv(base_e + exp.numel(), 8), GS=group_size, SL=sl, CH_G=chunk_groups,
        CH_B=chunk_bytes, M=m)
    return out.sum(1).to(x2.dtype) if splits > 1 else out.reshape(m, n)
