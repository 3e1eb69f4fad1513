"""The chain update (``UpdateConfig.flip_mode`` "chain"): ``arbfn::ternary_update_chain``.

Each weight keeps one *place bit* beside its trit, so a weight is a chain of six places, two per trit level:
place P = 2 (t + 1) + b reads as trit t = P // 2 - 1 (places 0, 1: -1; 2, 3: 0; 4, 5: +1). A vote moves P one
step along the chain, so a trit changes only after its place has crossed its level, and it keeps its place across
flips (a 1-bit counter that carries into the trit). Exponents stay at their initial values (no accumulator).

    ternary_update_chain(packed, places, grad, step, cutoff, k, group_size, scale, power, seed)
        -> (packed', places', flips)

packed uint8 [N, ceil(k/5)]; places int16 [N, ceil(k/16)], bit c % 16 of word c // 16 the place bit of column c
(bits beyond k zero; 16-bit words waste at most 15 bits a row, so narrow weights stay near 1/8 byte a weight);
grad float [N, k]; step and cutoff 0-dim int64 (cutoff: ``kernels.update.flip_cutoff`` of the step, floor(2**24 /
θ)); scale and power positive finite floats; seed the stream (0..2**32-1). The rule, per weight [n, c] of group g
(``group_size`` columns of row n):

* s = sign(grad) (0 for zero and NaN: no vote); the vote v = -s;
* r = |grad| / (scale * rms_g), rms_g the root mean square |grad| of the group's real columns (computed as the
  group max times the rms of the ratios to it, so that no square overflows); p = min(1, r) ** power, 0 where
  rms_g is 0 or not finite (a NaN or infinite gradient stops its group's moves);
* go = u < p * min(max(cutoff, 0), 2**24) in float32, u the 24-bit draw of ``kernels.update.draws`` (the
  stochastic mode's counter-based hash, so a step stays a function of (state, grad, step, seed));
* P' = clamp(P + v * go, 0, 5); t' and b' read from P'. flips = number of trits changed.

A weight's largest gradients in its group move most (power 3: mostly those above scale times the group's rms), and
the schedule's cutoff scales every move probability (1/θ). p is float32 arithmetic, so two implementations agree
except where p * cutoff falls within rounding of a draw.

:func:`ternary_update_chain_triton` runs the rule as one Triton kernel per weight (group sizes 8 to 64, as the
fused update): octets of columns per thread, the group max and rms from octet reductions, the draws of
``kernels.update``, each octet's place bits as one byte and its trit moves added to a copy of the old bytes by
``kernels.update``'s atomics. Under the interpreter it matches the reference (tests/kernels/test_update_chain.py);
it has not yet run on a GPU, so the op's CUDA dispatch stays the reference until it passes those tests there.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._triton import autotuned, cdiv, check_launchable, octet_columns, octet_trits
from kernels.packing import check_group_size, n_groups, pack_reference, packed_width, unpack_reference
from kernels.update import (_FUSED_CONFIGS, DRAW_BITS, MASK32, _add_octet_moves, _aligned_copy, _draws,
                            _octet_grads, _octet_tile, _sign_bits, _signs, draws, fused_tiles, fuses, step_key)

PLACE_BITS = 16  # place bits per word
PLACE_DTYPE = torch.int16  # the words' dtype (no other t_accum layout uses it)
PLACE_MASK = (1 << PLACE_BITS) - 1
LAST_PLACE = 5  # six places: 0..5


def places_width(k: int) -> int:
    """Words of place bits per row of a k-column weight."""
    return -(-k // PLACE_BITS)


def pack_places(bits: torch.Tensor) -> torch.Tensor:
    """int16 words [N, ceil(K/16)] of 0/1 place bits [N, K]: bit c % 16 of word c // 16 (higher bits zero)."""
    n, k = bits.shape
    padded = torch.nn.functional.pad(bits.to(torch.int64), (0, places_width(k) * PLACE_BITS - k))
    shifts = torch.arange(PLACE_BITS, dtype=torch.int64, device=bits.device)
    words = (padded.view(n, -1, PLACE_BITS) << shifts).sum(-1)
    return torch.where(words > PLACE_MASK >> 1, words - (PLACE_MASK + 1), words).to(PLACE_DTYPE)


def unpack_places(words: torch.Tensor, k: int) -> torch.Tensor:
    """The 0/1 place bits [N, k] (int64) of int16 words [N, ceil(k/16)]."""
    shifts = torch.arange(PLACE_BITS, dtype=torch.int64, device=words.device)
    bits = ((words.to(torch.int64) & PLACE_MASK)[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :k]


def check_chain_args(packed: torch.Tensor, places: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                     cutoff: torch.Tensor, k: int, group_size: int, scale: float, power: float, seed: int) -> None:
    """Raise ValueError on bad ints, floats, dtypes or shapes (metadata only: no data-dependent checks)."""
    check_group_size(group_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, x in (("scale", scale), ("power", power)):
        if not (x > 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a positive finite number, got {x}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be in 0..2**32-1, got {seed}")
    n = packed.shape[0] if packed.dim() == 2 else -1
    for name, t, dtype, shape in (("packed", packed, torch.uint8, (n, packed_width(k))),
                                  ("places", places, PLACE_DTYPE, (n, places_width(k)))):
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape} (k={k}), got {t.dtype} of shape "
                             f"{tuple(t.shape)}")
    if not grad.is_floating_point() or tuple(grad.shape) != (n, k):
        raise ValueError(f"grad must be a float tensor of shape {(n, k)}, got {grad.dtype} of shape "
                         f"{tuple(grad.shape)}")
    for name, t in (("step", step), ("cutoff", cutoff)):
        if t.dtype != torch.int64 or t.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if n * k >= 2**31:
        raise ValueError(f"N * k must be below 2**31 (int32 offsets), got {n} * {k}")


def move_probability(grad: torch.Tensor, group_size: int, scale: float, power: float) -> torch.Tensor:
    """p = min(1, |grad| / (scale * rms of its group's real columns)) ** power, float32 [N, k]; 0 in a group whose
    rms is 0 or not finite."""
    a = grad.abs().to(torch.float32)
    n, k = a.shape
    g = n_groups(k, group_size)
    groups = torch.nn.functional.pad(a, (0, g * group_size - k)).view(n, g, group_size)
    top = groups.amax(-1, keepdim=True)
    width = (k - torch.arange(g, device=a.device) * group_size).clamp(max=group_size).to(torch.float32)
    ratios = torch.where(top > 0, groups / top, 0.0)
    rms = top[..., 0] * (ratios.square().sum(-1) / width).sqrt()
    ok = (rms > 0) & torch.isfinite(rms)
    norm = torch.where(ok, rms * scale, 1.0).repeat_interleave(group_size, dim=1)[:, :k]
    p = (a / norm).clamp(max=1.0) ** power
    return torch.where(ok.repeat_interleave(group_size, dim=1)[:, :k], p, 0.0)


def ternary_update_chain_reference(packed: torch.Tensor, places: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                                   cutoff: torch.Tensor, k: int, group_size: int, scale: float, power: float,
                                   seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch chain rule (module docstring): (packed', places', flips)."""
    check_chain_args(packed, places, grad, step, cutoff, k, group_size, scale, power, seed)
    packed, places, grad = packed.contiguous(), places.contiguous(), grad.contiguous()
    t = unpack_reference(packed, k).to(torch.int64)
    s = _signs(grad)
    bound = cutoff.clamp(0, 1 << DRAW_BITS).to(torch.float32)
    go = draws(step_key(step, seed), packed.shape[0], k).to(torch.float32) < move_probability(
        grad, group_size, scale, power) * bound
    place = (2 * (t + 1) + unpack_places(places, k) - s * go).clamp(0, LAST_PLACE)
    new_t = place // 2 - 1
    return pack_reference(new_t.to(torch.int8)), pack_places(place % 2), (new_t != t).sum(dtype=torch.int64)


@triton.jit
def _per_octet(group_values, BLOCK_R: tl.constexpr, NGB: tl.constexpr, GS: tl.constexpr):
    """[BLOCK_R, NGB] values of a tile's groups spread to its octets: [BLOCK_R, NGB * GS // 8, 1]."""
    spread = tl.broadcast_to(group_values[:, :, None], (BLOCK_R, NGB, GS // 8))
    return tl.reshape(spread, (BLOCK_R, NGB * (GS // 8)))[:, :, None]


@autotuned(_FUSED_CONFIGS, key=["N", "K", "GS"], reset_to_zero=["count_ptr"], restore_value=["new_packed_ptr"])
@triton.jit(do_not_specialize=["N", "KB", "KP", "G", "SEED_HI", "SEED_LO"])
def _chain_kernel(packed_ptr, places_ptr, grad_ptr, step_ptr, cut_ptr, new_packed_ptr, new_places_ptr, count_ptr, N, K,
                  KB, KP, G, scale, power, SEED_HI, SEED_LO, GS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_O: tl.constexpr):
    """The chain rule on a [BLOCK_R rows, BLOCK_O octets, 8 columns] tile of whole groups (GS 8..8 * BLOCK_O):
    ``places_ptr`` / ``new_places_ptr`` are the place words as bytes (KP per row: byte o holds octet o's bits),
    ``new_packed_ptr`` a 4-byte aligned copy of the old packed bytes that takes each trit move's digit delta."""
    NGB: tl.constexpr = BLOCK_O * 8 // GS  # groups per tile row
    words, pid_r, pid_o, rn, row_ok, octets, j = _octet_tile(new_packed_ptr, N, BLOCK_R, BLOCK_O)
    octet_ok = row_ok[:, None] & (octets * 8 < K)[None, :]
    t = octet_trits(packed_ptr, rn, octets, octet_ok, KB)
    g = _octet_grads(grad_ptr, rn[:, None, None] * K + octets[None, :, None] * 8, row_ok[:, None, None], octets, K,
                     BLOCK_R, BLOCK_O)
    s = _sign_bits(g)
    a = tl.abs(g)
    # each group's max, then its rms as max * rms(ratio to it), both by octet reductions first
    # (one reciprocal per group, a multiply per weight: within rounding of the reference's divisions)
    top = tl.max(tl.reshape(tl.max(a, axis=2), (BLOCK_R, NGB, GS // 8)), axis=2)
    ratio = a * _per_octet(tl.where(top > 0, 1.0 / top, 0.0), BLOCK_R, NGB, GS)
    squares = tl.sum(tl.reshape(tl.sum(ratio * ratio, axis=2), (BLOCK_R, NGB, GS // 8)), axis=2)
    width = tl.maximum(tl.minimum(K - (pid_o * NGB + tl.arange(0, NGB)) * GS, GS), 1).to(tl.float32)
    rms = top * tl.sqrt(squares / width[None, :])
    ok = (rms > 0) & (rms <= 3.4028234663852886e38)  # positive and finite (NaN fails both)
    r = a * _per_octet(tl.where(ok, 1.0 / (rms * scale), 0.0), BLOCK_R, NGB, GS)
    p = tl.exp2(power * tl.log2(tl.minimum(r, 1.0)))  # min(1, r) ** power; 0 for r = 0
    p = tl.where(_per_octet(ok.to(tl.int32), BLOCK_R, NGB, GS) != 0, p, 0.0)  # an inf or NaN: no move in its group
    cut = tl.minimum(tl.maximum(tl.load(cut_ptr), 0), 1 << 24).to(tl.float32)
    go = _draws(step_ptr, SEED_HI, SEED_LO, rn[:, None, None] * K + octet_columns(octets)).to(tl.float32) < p * cut
    at = rn[:, None] * KP + octets[None, :]
    bits = (tl.load(places_ptr + at, mask=octet_ok, other=0).to(tl.int32)[:, :, None] >> j) & 1
    place = tl.minimum(tl.maximum(2 * (t + 1) + bits - s * go.to(tl.int32), 0), 5)
    dt = (place >> 1) - 1 - t
    tl.store(new_places_ptr + at, tl.sum((place & 1) << j, axis=2).to(tl.uint8), mask=octet_ok)
    _add_octet_moves(words, rn, octets, dt, j, row_ok, KB)
    pid = pid_r * tl.num_programs(1) + pid_o
    tl.store(count_ptr + pid, tl.sum(tl.sum(tl.sum(dt & 1, axis=2), axis=1), axis=0))  # |dt|


def ternary_update_chain_triton(packed: torch.Tensor, places: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                                cutoff: torch.Tensor, k: int, group_size: int, scale: float, power: float,
                                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chain rule by :func:`_chain_kernel` (CUDA, or CPU under the interpreter), for group sizes 8 to 64."""
    check_chain_args(packed, places, grad, step, cutoff, k, group_size, scale, power, seed)
    if not fuses(group_size):
        raise ValueError(f"the chain kernel takes group sizes 8, 16, 32 or 64, got {group_size}")
    check_launchable(packed, places, grad, step, cutoff)
    packed, places, grad = packed.contiguous(), places.contiguous(), grad.contiguous()
    n = packed.shape[0]
    new_packed = _aligned_copy(packed)
    new_places = torch.zeros_like(places)  # a row's last byte is padding where its octets are odd
    counts = torch.zeros(fused_tiles(n, k), dtype=torch.int32, device=packed.device)
    if n:
        place_bytes = places.view(torch.uint8)  # little-endian words: byte o of a row holds octet o's bits
        _chain_kernel[lambda m: (cdiv(n, m["BLOCK_R"]), cdiv(cdiv(k, 8), m["BLOCK_O"]))](
            packed, place_bytes, grad, step, cutoff, new_packed, new_places.view(torch.uint8), counts, n, k,
            packed_width(k), place_bytes.shape[1], n_groups(k, group_size), float(scale), float(power), seed >> 16,
            seed & 0xFFFF, GS=group_size)
    return new_packed, new_places, counts.sum(dtype=torch.int64)


@torch.library.custom_op("arbfn::ternary_update_chain", mutates_args=())
def ternary_update_chain(packed: torch.Tensor, places: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                         cutoff: torch.Tensor, k: int, group_size: int, scale: float, power: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chain step of one weight: (packed', places', flips); the reference on every device (no kernel yet)."""
    return ternary_update_chain_reference(packed, places, grad, step, cutoff, k, group_size, scale, power, seed)


@ternary_update_chain.register_fake
def _(packed, places, grad, step, cutoff, k, group_size, scale, power, seed):
    check_chain_args(packed, places, grad, step, cutoff, k, group_size, scale, power, seed)
    return packed.new_empty(packed.shape), places.new_empty(places.shape), packed.new_empty((), dtype=torch.int64)
