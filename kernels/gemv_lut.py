"""Few-row ternary GEMV through a per-call lookup table: ``y[m] = x[m] @ W.T`` for the M = 1 decode path.

A packed byte holds 5 trits, so it takes one of 243 values. For each input row m, group g and byte slot s
(the s-th byte that group g's columns touch), the table holds, for every byte value v,
``table[m, g, s, v] = Σ_d trit_d(v) · x[m, 5·(g·GS//5 + s) + d]`` over the digits d whose column lies in group
g (fp32: the same five products as a decode, summed once per call instead of once per weight row; 1 KB per
(input row, group, slot), so 2 MiB for one row of K = 8192 at group size 32). The GEMV
then costs one byte extraction, one table load and one add per (row, slot), and the group's scale ``2**E``
once per (row, group): ``y[m, n] = Σ_g 2**E[n, g] · Σ_s table[m, g, s, byte(n, g, s)]``.

Lanes span rows, so a warp's 32 lookups at one (g, s) fall in one 1 KB table (a few L1 lines). Each lane
reads its row's bytes for one group as three aligned 4-byte words and extracts its bytes with funnel shifts
(one uncoalesced word load serves four bytes, where a byte load serves one). A group may touch at most 8 bytes
(:func:`fits`: group sizes up to 36); other group sizes use the grouped GEMV in kernels/linear.py.

Measured against that GEMV and bf16 cuBLAS in benchmarks/RESULTS.md (M = 1 on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotuned, cdiv, pow2_exact
from kernels.packing import n_groups, packed_width

MAX_SLOTS = 8  # bytes a group may touch: the GEMV extracts them from three words (a 0..3 byte offset + 8 bytes)
TABLE_WIDTH = 256  # entries per (group, slot): the 243 byte values, padded to a power of two (the rest 0)


def slots(group_size: int) -> int:
    """The most bytes one group's columns can touch (a group starting on a byte's last digit)."""
    return (group_size + 3) // 5 + 1


def fits(group_size: int) -> bool:
    """Whether the table GEMV handles this group size (each group touches at most MAX_SLOTS bytes)."""
    return slots(group_size) <= MAX_SLOTS


_TABLE_BLOCK = 16  # (group, slot) pairs per table program


@triton.jit(do_not_specialize=["K", "G"])
def _table_kernel(x_ptr, table_ptr, K, G, GS: tl.constexpr, SL: tl.constexpr, BLOCK: tl.constexpr):
    """table[m, g, s, v] for BLOCK (group, slot) pairs of input row m = program_id(1): zero for byte values
    past 242 and for digits outside the group or past K."""
    m = tl.program_id(1)
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pair < G * SL
    col_lo = (pair // SL) * GS
    col_hi = tl.minimum(col_lo + GS, K)
    byte_i = col_lo // 5 + pair % SL
    v = tl.arange(0, 256)
    entry = tl.zeros((BLOCK, 256), tl.float32)
    place = 1
    for d in tl.static_range(5):
        col = byte_i * 5 + d
        xd = tl.load(x_ptr + m * K + col, mask=ok & (col >= col_lo) & (col < col_hi), other=0.0).to(tl.float32)
        trit = tl.where(v < 243, ((v // place) % 3 - 1).to(tl.float32), 0.0)
        entry += xd[:, None] * trit[None, :]
        place = place * 3
    tl.store(table_ptr + (m * G * SL + pair)[:, None] * 256 + v[None, :], entry, mask=ok[:, None])


@triton.jit
def _funnel(lo, hi, shift):
    """Bytes 0..3 of the 8-byte window ``hi:lo`` (uint32 words) after a right shift by ``shift`` bits (0..24)."""
    return (((hi.to(tl.uint64) << 32) | lo.to(tl.uint64)) >> shift.to(tl.uint64)).to(tl.uint32)


_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((256, 8), (128, 4), (256, 4), (64, 2))]


@autotuned(_CONFIGS, key=["N", "K", "GS"])
@triton.jit(do_not_specialize=["N", "K", "KB", "G", "SPLIT_G", "BASE", "N_WORDS"])  # scalar gathers only
def _gemv_kernel(table_ptr, out_ptr, packed_ptr, exp_ptr, N, K, KB, G, SPLIT_G, BASE, N_WORDS,
                 GS: tl.constexpr, SL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, K split, input row m) writes ``Σ_g 2**E[n, g] Σ_s table[m, g, s, byte]`` over its
    SPLIT_G groups into ``out[m, split, n]`` (fp32). ``packed_ptr - BASE`` is 4-byte aligned; N_WORDS words
    cover the packed weight. The first and last words may hold up to 3 bytes outside it, which are read (never
    past an aligned word, so never past an allocation) but never used."""
    pid_s, m = tl.program_id(1), tl.program_id(2)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < N
    words = (packed_ptr - BASE).to(tl.pointer_type(tl.uint32), bitcast=True)
    table = table_ptr + m * G * SL * 256
    acc = tl.zeros((BLOCK_N,), tl.float32)
    g_start = pid_s * SPLIT_G
    for g in range(g_start, tl.minimum(G, g_start + SPLIT_G)):
        first = g * GS // 5
        at = BASE + rn * KB + first  # the group's first byte, counted from the aligned base
        w = at >> 2
        shift = ((at & 3) * 8).to(tl.uint32)
        w0 = tl.load(words + w, mask=ok, other=0)
        w1 = tl.load(words + w + 1, mask=ok & (w + 1 < N_WORDS), other=0)
        w2 = tl.load(words + w + 2, mask=ok & (w + 2 < N_WORDS), other=0)
        low, high = _funnel(w0, w1, shift), _funnel(w1, w2, shift)  # the group's bytes 0..3 and 4..7
        val = tl.zeros((BLOCK_N,), tl.float32)
        for s in tl.static_range(SL):  # a slot past the group's columns (or past K) has an all-zero table
            if s < 4:
                byte = (low >> (8 * s)) & 255
            else:
                byte = (high >> (8 * (s - 4))) & 255
            val += tl.load(table + (g * SL + s) * 256 + byte.to(tl.int32))
        e = tl.load(exp_ptr + rn * G + g, mask=ok, other=0).to(tl.int32)
        acc += pow2_exact(e) * val
    tl.store(out_ptr + (m * tl.num_programs(1) + pid_s) * N + rn, acc, mask=ok)


def gemv_lut(x2: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int,
             splits: int) -> torch.Tensor:
    """``x2 @ W.T`` for x2 [M, k] (contiguous CUDA tensors, or CPU under the interpreter) over ``splits`` K
    ranges of groups; returns [M, N] in x2's dtype. Raises ValueError for a group size :func:`fits` rejects."""
    if not fits(group_size):
        raise ValueError(f"the table GEMV takes group sizes whose groups touch at most {MAX_SLOTS} bytes "
                         f"(up to 36), got {group_size}")
    m, n, g = x2.shape[0], packed.shape[0], n_groups(k, group_size)
    sl = slots(group_size)
    table = torch.empty((m, g, sl, TABLE_WIDTH), dtype=torch.float32, device=x2.device)
    _table_kernel[(cdiv(g * sl, _TABLE_BLOCK), m)](x2, table, k, g, GS=group_size, SL=sl, BLOCK=_TABLE_BLOCK)
    split_g = cdiv(g, splits)
    splits = cdiv(g, split_g)
    out = torch.empty((m, splits, n), dtype=torch.float32, device=x2.device)
    base = packed.data_ptr() % 4
    _gemv_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), splits, m)](
        table, out, packed, exp, n, k, packed_width(k), g, split_g, base, cdiv(base + packed.numel(), 4),
        GS=group_size, SL=sl)
    return out.sum(1).to(x2.dtype)
