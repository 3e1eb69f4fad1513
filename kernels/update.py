"""The sign-vote update: flip packed trits and move group exponents from the signs of ``dL/dW``.

Op ``arbfn::ternary_update(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold,
exp_threshold) -> (packed', exp', t_accum', e_accum', flips, exp_moves)``; a pure function (new tensors,
inputs never written). Shapes: packed uint8 [N, ceil(k/5)], exp int8 [N, G] with G = ceil(k/group_size),
t_accum int8 [N, k], e_accum int8 [N, G], grad float [N, k] = dL/dW; flips and exp_moves are 0-dim int64.

The rule, with θ = flip_threshold and θE = exp_threshold (both 1..127), all arithmetic in int32:

* sign s = +1 where grad > 0, -1 where grad < 0, 0 where grad == 0 or NaN (NaN never votes);
  the trit vote is v = -s (descent direction).
* flip, with the OLD trit t: a = clamp(t_accum + v, -θ, θ) (saturates, never wraps);
  up = (a >= θ) & (t < 1); down = (a <= -θ) & (t > -1); t' = t + up - down; a' = 0 where up | down, else a.
* exponent, per group g of row n, with the OLD trits (same gradient signs, before the flip):
  score = Σ_{k in g, k < K} s_k * t_k; b = clamp(e_accum - sign(score), -θE, θE);
  if b >= θE and E < 127: E += 1, b -= θE; elif b <= -θE and E > -128: E -= 1, b += θE.
  (A saturated E keeps its accumulator at ±θE.)
* padding trits (columns >= k of a row's last byte) are written as zero trits (digit 1), always.
* flips = number of trits changed; exp_moves = number of exponents changed.

CUDA runs two Triton kernels over flattened indices (exponent: a block of (row, group) pairs per
program; flip: a block of (row, packed byte) pairs per program, 5 digits each), each writing a
per-program int32 count that torch sums to int64 (deterministic, no atomics). Offsets are int32, so
N * k must stay below 2**31. CPU runs the pure-torch reference, which is also the tests' oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable, trit_of
from kernels.packing import check_group_size, n_groups, pack_reference, packed_width, unpack_reference

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MAX_THRESHOLD = 127


def check_update_args(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                      grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int) -> None:
    """Raise ValueError on bad ints, dtypes or shapes (metadata only: no data-dependent checks)."""
    for name, th in (("flip_threshold", flip_threshold), ("exp_threshold", exp_threshold)):
        if not 1 <= th <= MAX_THRESHOLD:
            raise ValueError(f"{name} must be in 1..{MAX_THRESHOLD}, got {th}")
    check_group_size(group_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, kb, g = packed.shape[0] if packed.dim() == 2 else -1, packed_width(k), n_groups(k, group_size)
    expect = (("packed", packed, torch.uint8, (n, kb)), ("exp", exp, torch.int8, (n, g)),
              ("t_accum", t_accum, torch.int8, (n, k)), ("e_accum", e_accum, torch.int8, (n, g)))
    for name, t, dtype, shape in expect:
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape} (k={k}, group_size={group_size}), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if not grad.is_floating_point() or tuple(grad.shape) != (n, k):
        raise ValueError(f"grad must be a float tensor of shape {(n, k)}, got {grad.dtype} of shape {tuple(grad.shape)}")
    if n * k >= 2**31:
        raise ValueError(f"N * k must be below 2**31 (int32 offsets), got {n} * {k}")


# ---------------------------------------------------------------- reference (CPU path, test oracle)


def ternary_update_reference(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                             grad: torch.Tensor, k: int, group_size: int, flip_threshold: int,
                             exp_threshold: int) -> Outputs:
    """Pure-torch update rule (see the module docstring)."""
    check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)
    packed, exp, t_accum, e_accum, grad = (x.contiguous() for x in (packed, exp, t_accum, e_accum, grad))
    n, th, the = packed.shape[0], flip_threshold, exp_threshold
    t = unpack_reference(packed, k).to(torch.int32)
    s = (grad > 0).to(torch.int32) - (grad < 0).to(torch.int32)
    a = (t_accum.to(torch.int32) - s).clamp(-th, th)
    up, down = (a >= th) & (t < 1), (a <= -th) & (t > -1)
    moved = up | down
    new_t = (t + up.to(torch.int32) - down.to(torch.int32)).to(torch.int8)
    new_a = torch.where(moved, 0, a).to(torch.int8)
    g = n_groups(k, group_size)
    score = torch.nn.functional.pad(s * t, (0, g * group_size - k)).view(n, g, group_size).sum(-1)
    e = exp.to(torch.int32)
    b = (e_accum.to(torch.int32) - torch.sign(score)).clamp(-the, the)
    inc, dec = (b >= the) & (e < 127), (b <= -the) & (e > -128)
    inc_i, dec_i = inc.to(torch.int32), dec.to(torch.int32)
    new_e = (e + inc_i - dec_i).to(torch.int8)
    new_b = (b - the * inc_i + the * dec_i).to(torch.int8)
    flips = moved.sum(dtype=torch.int64)
    moves = (inc | dec).sum(dtype=torch.int64)
    return pack_reference(new_t), new_e, new_a, new_b, flips, moves


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _sign_of(grad_ptr, offs, mask):
    """int32 sign of grad (0 for zero, NaN and masked lanes)."""
    gr = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (gr > 0.0).to(tl.int32) - (gr < 0.0).to(tl.int32)


@triton.jit(do_not_specialize=["NG", "K", "KB", "G", "THE"])  # sizes vary per call: one compile, not one per size
def _exp_update_kernel(packed_ptr, exp_ptr, e_accum_ptr, grad_ptr, new_exp_ptr, new_e_accum_ptr, count_ptr,
                       NG, K, KB, G, THE, GS: tl.constexpr, GS_P2: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flat (row, group) index over N * G
    qmask = q < NG
    row, grp = q // G, q % G
    j = tl.arange(0, GS_P2)
    cols = grp[:, None] * GS + j[None, :]
    mask = qmask[:, None] & (j[None, :] < GS) & (cols < K)
    byte = tl.load(packed_ptr + row[:, None] * KB + cols // 5, mask=mask, other=121).to(tl.int32)
    s = _sign_of(grad_ptr, row[:, None] * K + cols, mask)
    score = tl.sum(s * trit_of(byte, cols), axis=1)
    e = tl.load(exp_ptr + q, mask=qmask, other=0).to(tl.int32)
    b = tl.load(e_accum_ptr + q, mask=qmask, other=0).to(tl.int32)
    b = tl.minimum(tl.maximum(b - ((score > 0).to(tl.int32) - (score < 0).to(tl.int32)), -THE), THE)
    inc = ((b >= THE) & (e < 127)).to(tl.int32)
    dec = ((b <= -THE) & (e > -128)).to(tl.int32)
    tl.store(new_exp_ptr + q, (e + inc - dec).to(tl.int8), mask=qmask)
    tl.store(new_e_accum_ptr + q, (b - THE * inc + THE * dec).to(tl.int8), mask=qmask)
    tl.store(count_ptr + pid, tl.sum(tl.where(qmask, inc + dec, 0), axis=0))


@triton.jit(do_not_specialize=["NKB", "K", "KB", "TH"])  # sizes vary per call: one compile, not one per size
def _flip_kernel(packed_ptr, t_accum_ptr, grad_ptr, new_packed_ptr, new_t_accum_ptr, count_ptr,
                 NKB, K, KB, TH, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    q = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # flat (row, byte) index over N * KB
    qmask = q < NKB
    row, bcol = q // KB, q % KB
    byte = tl.load(packed_ptr + q, mask=qmask, other=121).to(tl.int32)
    new_byte = tl.zeros((BLOCK_B,), tl.int32)
    flips = tl.zeros((BLOCK_B,), tl.int32)
    weight = 1
    for i in tl.static_range(5):
        cols = bcol * 5 + i
        mask = qmask & (cols < K)
        offs = row * K + cols
        t = trit_of(byte, cols)
        a = tl.load(t_accum_ptr + offs, mask=mask, other=0).to(tl.int32) - _sign_of(grad_ptr, offs, mask)
        a = tl.minimum(tl.maximum(a, -TH), TH)
        up = ((a >= TH) & (t < 1)).to(tl.int32)
        down = ((a <= -TH) & (t > -1)).to(tl.int32)
        moved = up + down
        tl.store(new_t_accum_ptr + offs, tl.where(moved > 0, 0, a).to(tl.int8), mask=mask)
        new_byte += tl.where(mask, t + up - down + 1, 1) * weight
        flips += tl.where(mask, moved, 0)
        weight *= 3
    tl.store(new_packed_ptr + q, new_byte.to(tl.uint8), mask=qmask)
    tl.store(count_ptr + pid, tl.sum(flips, axis=0))


_FLIP_BLOCK = 1024  # packed bytes per flip program
_EXP_TILE = 4096  # elements per exponent program (BLOCK_Q * GS_P2)


def ternary_update_triton(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                          grad: torch.Tensor, k: int, group_size: int, flip_threshold: int,
                          exp_threshold: int) -> Outputs:
    """Launch the exponent and flip kernels (CUDA, or CPU under the interpreter)."""
    check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)
    check_launchable(packed, exp, t_accum, e_accum, grad)
    packed, exp, t_accum, e_accum, grad = (x.contiguous() for x in (packed, exp, t_accum, e_accum, grad))
    n, kb, g = packed.shape[0], packed_width(k), n_groups(k, group_size)
    new_packed, new_t_accum = packed.new_empty(packed.shape), t_accum.new_empty(t_accum.shape)
    new_exp, new_e_accum = exp.new_empty(exp.shape), e_accum.new_empty(e_accum.shape)
    if n == 0:
        zero = torch.zeros((), dtype=torch.int64, device=packed.device)
        return new_packed, new_exp, new_t_accum, new_e_accum, zero, zero.clone()
    gs_p2 = triton.next_power_of_2(group_size)
    block_q = min(_EXP_TILE // gs_p2, triton.next_power_of_2(n * g))
    exp_counts = torch.empty(cdiv(n * g, block_q), dtype=torch.int32, device=packed.device)
    _exp_update_kernel[(exp_counts.numel(),)](packed, exp, e_accum, grad, new_exp, new_e_accum, exp_counts, n * g,
                                              k, kb, g, exp_threshold, GS=group_size, GS_P2=gs_p2, BLOCK_Q=block_q)
    block_b = min(_FLIP_BLOCK, triton.next_power_of_2(n * kb))
    flip_counts = torch.empty(cdiv(n * kb, block_b), dtype=torch.int32, device=packed.device)
    _flip_kernel[(flip_counts.numel(),)](packed, t_accum, grad, new_packed, new_t_accum, flip_counts, n * kb, k, kb,
                                         flip_threshold, BLOCK_B=block_b)
    return (new_packed, new_exp, new_t_accum, new_e_accum,
            flip_counts.sum(dtype=torch.int64), exp_counts.sum(dtype=torch.int64))


# ---------------------------------------------------------------- op


@torch.library.custom_op("arbfn::ternary_update", mutates_args=())
def ternary_update(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                   grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sign-vote step: (packed', exp', t_accum', e_accum', flips, exp_moves); see the module docstring."""
    return ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)


@ternary_update.register_kernel("cuda")
def _(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold):
    return ternary_update_triton(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)


@ternary_update.register_fake
def _(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold):
    check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)
    return (packed.new_empty(packed.shape), exp.new_empty(exp.shape), t_accum.new_empty(t_accum.shape),
            e_accum.new_empty(e_accum.shape), packed.new_empty((), dtype=torch.int64),
            packed.new_empty((), dtype=torch.int64))
