"""The sign-vote update: flip packed trits and move group exponents from the signs of ``dL/dW``.

Three ops, each a pure function (new tensors, inputs never written; kernels/update_group.py runs the same
kernels for a whole list of weights as one op):

* ``arbfn::ternary_update(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold,
  exp_threshold) -> (packed', exp', t_accum', e_accum', flips, exp_moves)``: counter flips (below);
* ``arbfn::ternary_update_nibble(...)``: the same arguments and the same rule as ``ternary_update``, with
  4-bit counters packed two per byte (half a byte per weight instead of one; θ at most 7);
* ``arbfn::ternary_update_stochastic(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold,
  seed) -> (packed', exp', e_accum', flips, exp_moves)``: counter-free flips (below), no per-weight state at
  all (1 byte per weight less than the counter op).

Shapes: packed uint8 [N, ceil(k/5)], exp int8 [N, G] with G = ceil(k/group_size), t_accum int8 [N, k]
(``ternary_update_nibble``: uint8 [N, ceil(k/2)], below), e_accum int8 [N, G], grad float [N, k] = dL/dW,
step and cutoff 0-dim int64 tensors; flips and exp_moves are 0-dim int64.

4-bit counters (:func:`pack_nibbles`): the counter of column c sits in byte c // 2 of its row, in the low
nibble for even c and the high nibble for odd c, in two's complement: a value v in -8..7 is stored as v & 15
and a nibble u reads back as u - 16 where u >= 8. The padding nibble (high nibble of a row's last byte when k
is odd) is ignored on input and written 0.

The rule, with θ = flip_threshold (1..127; 1..7 for 4-bit counters; 1..2**24 for stochastic flips) and
θE = exp_threshold (1..127), votes in int32:

* sign s = +1 where grad > 0, -1 where grad < 0, 0 where grad == 0 or NaN (NaN never votes);
  the trit vote is v = -s (descent direction).
* counter flip, with the OLD trit t: a = clamp(t_accum + v, -θ, θ) (saturates, never wraps);
  up = (a >= θ) & (t < 1); down = (a <= -θ) & (t > -1); t' = t + up - down; a' = 0 where up | down, else a.
* stochastic flip, with the OLD trit t: go = u < cutoff, with u the draw of this weight;
  up = go & (v > 0) & (t < 1); down = go & (v < 0) & (t > -1); t' = t + up - down. The cutoff is
  :func:`flip_cutoff` of the step: floor(2**24 / θ) for a flip threshold θ (1..2**24), so a vote moves its
  trit with probability floor(2**24/θ) / 2**24 ≈ 1/θ (always for θ = 1, where both flip rules agree); with a
  schedule θ anneals geometrically from θ to θ1 over T steps: floor(2**24 / (θ * (θ1/θ)**(clamp(step, 0,
  T)/T))) in float64, exactly 2**24 // θ1 from step T on, so fewer trits move as training goes on (the
  noise floor of votes that split evenly falls with it). Any int64 cutoff is valid: <= 0 moves nothing,
  >= 2**24 every vote. It is a tensor input, computed once per step by the caller (arbfn/train.py: fused
  into the compiled step), so a compiled or graphed step anneals without recompiling and without a launch
  per weight.
  The draw is a counter-based hash, so a step stays a function of (state, grad, step, seed):
  key = mix32((step mod 2**32) * W + seed mod 2**32); u = mix32((n*k + c) * W + key mod 2**32) >> 8 for
  weight [n, c], with W = 0x61C88647 and mix32 Wellons' lowbias32 (multipliers 0x21F0AAAD, 0x735A2D97).
  The reference hashes in int64 on values below 2**32 (times constants below 2**31, so no product
  overflows); the kernels in uint32, whose products wrap mod 2**32 as the masks do, and they compute the key
  from the step themselves (no 8-bit type: the Triton interpreter's weak spot). ``seed`` (0 <= seed < 2**32)
  names the stream; :func:`stream_seed` derives one per tensor from a run seed.
* exponent, per group g of row n, with the OLD trits (same gradient signs, before the flip):
  score = Σ_{k in g, k < K} s_k * t_k; b = clamp(e_accum - sign(score), -θE, θE);
  if b >= θE and E < 127: E += 1, b -= θE; elif b <= -θE and E > -128: E -= 1, b += θE.
  (A saturated E keeps its accumulator at ±θE.)
* padding trits (columns >= k of a row's last byte) are written as zero trits (digit 1), always.
* flips = number of trits changed; exp_moves = number of exponents changed.

CUDA runs, for group sizes 8, 16, 32 and 64, one fused Triton kernel per op (:func:`_fused_kernel`: octets of
columns per thread, both rules, flipped trits added to their bytes by integer atomics, which commute, so the
result is deterministic); for other group sizes two kernels over flattened indices (exponent: a block of
(row, group) pairs per program; flip: a block of (row, span) pairs per program, a span being two packed bytes:
10 columns, whose 4-bit counters fill 5 whole bytes, so no byte is shared between programs). Tile sizes are
autotuned per shape; each program writes int32 counts that torch sums to int64. Nibbles are
loaded as bytes, widened to int32 at once and taken apart there (the interpreter's uint8 bit twiddling is
unreliable, DESIGN.md §7). Offsets are int32, so N * k must stay below 2**31. CPU runs the pure-torch
reference, which is also the tests' oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotuned, cdiv, check_launchable, octet_columns, octet_trits, pow3, trit_of
from kernels.packing import check_group_size, n_groups, pack_reference, packed_width, unpack_reference

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
StochasticOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MAX_THRESHOLD = 127
MAX_DRAW_THRESHOLD = 1 << 24  # the largest stochastic flip threshold: its cutoff floor(2**24/θ) is then 1
COUNTER_LIMITS = {8: MAX_THRESHOLD, 4: 7}  # counter bits -> the largest flip threshold the counter holds
MASK32 = 0xFFFFFFFF
WEYL = 0x61C88647  # 2**32 - the golden-ratio constant 0x9E3779B9: below 2**31, odd
MIX1, MIX2 = 0x21F0AAAD, 0x735A2D97  # lowbias32 multipliers, both below 2**31
DRAW_BITS = 24  # u is a 24-bit draw


def check_counter_bits(counter_bits: int) -> None:
    """Raise ValueError unless ``counter_bits`` is a flip-counter width the ops implement (8 or 4)."""
    if counter_bits not in COUNTER_LIMITS:
        raise ValueError(f"counter_bits must be one of {sorted(COUNTER_LIMITS, reverse=True)}, got {counter_bits}")


def counter_layout(k: int, counter_bits: int) -> tuple[torch.dtype, int]:
    """(dtype, bytes per row) of the flip counters of a k-column weight: int8 k, or uint8 ceil(k/2) for 4 bits."""
    check_counter_bits(counter_bits)
    return (torch.int8, k) if counter_bits == 8 else (torch.uint8, cdiv(k, 2))


def check_update_args(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor | None, e_accum: torch.Tensor,
                      grad: torch.Tensor, k: int, group_size: int, flip_threshold: int | None, exp_threshold: int,
                      counter_bits: int = 8) -> None:
    """Raise ValueError on bad ints, dtypes or shapes (metadata only: no data-dependent checks).

    ``t_accum=None`` (and ``flip_threshold=None``) checks the stochastic op's arguments, which have no per-weight
    accumulator and take a cutoff tensor instead of a threshold; otherwise ``t_accum`` must have the layout of
    ``counter_bits`` and the flip threshold must fit in its counter."""
    check_counter_bits(counter_bits)
    for name, th in (("flip_threshold", flip_threshold), ("exp_threshold", exp_threshold)):
        if th is not None and not 1 <= th <= MAX_THRESHOLD:
            raise ValueError(f"{name} must be in 1..{MAX_THRESHOLD}, got {th}")
    if t_accum is not None and flip_threshold > COUNTER_LIMITS[counter_bits]:
        raise ValueError(f"flip_threshold must be at most {COUNTER_LIMITS[counter_bits]} for {counter_bits}-bit "
                         f"counters, got {flip_threshold}")
    check_group_size(group_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, kb, g = packed.shape[0] if packed.dim() == 2 else -1, packed_width(k), n_groups(k, group_size)
    expect = [("packed", packed, torch.uint8, (n, kb)), ("exp", exp, torch.int8, (n, g)),
              ("e_accum", e_accum, torch.int8, (n, g))]
    if t_accum is not None:
        dtype, width = counter_layout(k, counter_bits)
        expect.append(("t_accum", t_accum, dtype, (n, width)))
    for name, t, dtype, shape in expect:
        if t.dtype != dtype or tuple(t.shape) != shape:
            bits = f", {counter_bits}-bit counters" if name == "t_accum" else ""
            raise ValueError(f"{name} must be {dtype} of shape {shape} (k={k}, group_size={group_size}{bits}), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if not grad.is_floating_point() or tuple(grad.shape) != (n, k):
        raise ValueError(f"grad must be a float tensor of shape {(n, k)}, got {grad.dtype} of shape {tuple(grad.shape)}")
    if n * k >= 2**31:
        raise ValueError(f"N * k must be below 2**31 (int32 offsets), got {n} * {k}")


def check_flip_schedule(flip_threshold: int, flip_threshold_final: int = 0, anneal_steps: int = 0) -> None:
    """Raise ValueError unless θ is in 1..2**24 and (θ1, T) is no schedule (0, 0) or a final threshold in
    1..2**24 reached after T >= 1 steps."""
    if not 1 <= flip_threshold <= MAX_DRAW_THRESHOLD:
        raise ValueError(f"flip_threshold must be in 1..{MAX_DRAW_THRESHOLD} for stochastic flips, got "
                         f"{flip_threshold}")
    if flip_threshold_final == 0:
        if anneal_steps != 0:
            raise ValueError(f"anneal_steps needs flip_threshold_final (the threshold to anneal to), got "
                             f"anneal_steps={anneal_steps} with flip_threshold_final=0")
        return
    if not 1 <= flip_threshold_final <= MAX_DRAW_THRESHOLD:
        raise ValueError(f"flip_threshold_final must be in 1..{MAX_DRAW_THRESHOLD} (or 0: no annealing), got "
                         f"{flip_threshold_final}")
    if anneal_steps < 1:
        raise ValueError(f"anneal_steps must be >= 1 with flip_threshold_final={flip_threshold_final}, got "
                         f"{anneal_steps}")


def check_stochastic_args(packed: torch.Tensor, exp: torch.Tensor, e_accum: torch.Tensor, grad: torch.Tensor,
                          step: torch.Tensor, cutoff: torch.Tensor, k: int, group_size: int, exp_threshold: int,
                          seed: int) -> None:
    """:func:`check_update_args` for the stochastic op, plus its step and cutoff tensors and seed."""
    check_update_args(packed, exp, None, e_accum, grad, k, group_size, None, exp_threshold)
    for name, t in (("step", step), ("cutoff", cutoff)):
        if t.dtype != torch.int64 or t.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be in 0..2**32-1, got {seed}")


# ---------------------------------------------------------------- the counter-based hash (torch and Python ints)


def mix32(x):
    """Wellons' lowbias32 of ``x`` in [0, 2**32) (a Python int or an int64 tensor); the same in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX2) & MASK32
    return x ^ (x >> 15)


def stream_seed(seed: int, index: int) -> int:
    """A 32-bit stream id for tensor number ``index`` of a run seeded ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return mix32(mix32(seed & MASK32) ^ (index & MASK32))


def step_key(step: torch.Tensor, seed: int) -> torch.Tensor:
    """The 0-dim int64 key in [0, 2**32) of one (step, stream), in torch ops (the reference's; the kernels
    compute the same key from the step themselves)."""
    return mix32(((step & MASK32) * WEYL + seed) & MASK32)


def draws(key: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 24-bit draws u [n, k] (int64) of every weight under ``key``."""
    idx = torch.arange(n * k, dtype=torch.int64, device=key.device).view(n, k)
    return mix32((idx * WEYL + key) & MASK32) >> (32 - DRAW_BITS)


ANNEAL_SHAPES = ("geometric", "cosine")


def flip_cutoff(step: torch.Tensor, flip_threshold: int, flip_threshold_final: int = 0,
                anneal_steps: int = 0, shape: str = "geometric") -> torch.Tensor:
    """The 0-dim int64 cutoff at ``step`` (a vote moves its trit where its draw is below it): floor(2**24 / θ)
    for a constant θ, else θ annealed to ``flip_threshold_final`` over ``anneal_steps`` (module docstring):
    geometrically, or with ``shape`` "cosine" the move rate 1/θ on a half cosine, 1/θ1 + (1/θ0 - 1/θ1) * (1 +
    cos(pi * step / T)) / 2, which holds near 1/θ0 longer and falls faster at the end. Torch ops on the step
    tensor, so a compiled step fuses them and a graph never bakes them in."""
    check_flip_schedule(flip_threshold, flip_threshold_final, anneal_steps)
    if shape not in ANNEAL_SHAPES:
        raise ValueError(f"shape must be one of {ANNEAL_SHAPES}, got {shape!r}")
    last = torch.full((), (1 << DRAW_BITS) // (flip_threshold_final or flip_threshold), dtype=torch.int64,
                      device=step.device)
    if flip_threshold_final == 0:
        return last
    frac = step.clamp(0, anneal_steps).to(torch.float64) / anneal_steps
    if shape == "cosine":
        rate = 1 / flip_threshold_final + (1 / flip_threshold - 1 / flip_threshold_final) * (
            1 + torch.cos(torch.pi * frac)) / 2
        cut = torch.floor((1 << DRAW_BITS) * rate)
    else:
        cut = torch.floor((1 << DRAW_BITS) / (flip_threshold * (flip_threshold_final / flip_threshold) ** frac))
    return torch.where(step >= anneal_steps, last, cut.to(torch.int64))


# ---------------------------------------------------------------- 4-bit counters (torch)


def pack_nibbles(counters: torch.Tensor) -> torch.Tensor:
    """Counters [N, k] (any integer dtype, values in -8..7) as uint8 [N, ceil(k/2)] two's-complement nibbles,
    column 2j in the low nibble of byte j; a padding nibble is 0."""
    if counters.dim() != 2 or counters.is_floating_point():
        raise ValueError(f"counters must be an integer tensor [N, k], got {counters.dtype} {tuple(counters.shape)}")
    if counters.numel() and not bool(((counters >= -8) & (counters <= 7)).all()):
        raise ValueError("4-bit counters must lie in -8..7")
    n, k = counters.shape
    x = torch.nn.functional.pad(counters.to(torch.int32) & 15, (0, k % 2)).view(n, cdiv(k, 2), 2)
    return (x[..., 0] | (x[..., 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The int8 counters [N, k] (-8..7) of :func:`pack_nibbles` output ``packed`` [N, ceil(k/2)]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != cdiv(k, 2):
        raise ValueError(f"packed nibbles for k={k} must be uint8 [N, {cdiv(k, 2)}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    x = packed.to(torch.int32)
    v = torch.stack((x & 15, x >> 4), dim=-1).view(packed.shape[0], 2 * packed.shape[1])[:, :k]
    return (v - ((v >> 3) << 4)).to(torch.int8)


# ---------------------------------------------------------------- reference (CPU path, test oracle)


def _signs(grad: torch.Tensor) -> torch.Tensor:
    return (grad > 0).to(torch.int32) - (grad < 0).to(torch.int32)


def _exponent_rule(t: torch.Tensor, s: torch.Tensor, exp: torch.Tensor, e_accum: torch.Tensor, k: int,
                   group_size: int, the: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp', e_accum', exp_moves) from the OLD trits ``t`` and signs ``s`` (both int32 [N, k])."""
    n, g = t.shape[0], n_groups(k, group_size)
    score = torch.nn.functional.pad(s * t, (0, g * group_size - k)).view(n, g, group_size).sum(-1)
    e = exp.to(torch.int32)
    b = (e_accum.to(torch.int32) - torch.sign(score)).clamp(-the, the)
    inc, dec = (b >= the) & (e < 127), (b <= -the) & (e > -128)
    inc_i, dec_i = inc.to(torch.int32), dec.to(torch.int32)
    new_e = (e + inc_i - dec_i).to(torch.int8)
    new_b = (b - the * inc_i + the * dec_i).to(torch.int8)
    return new_e, new_b, (inc | dec).sum(dtype=torch.int64)


def _moved(t: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed new trits, flips) from the old trits and the up/down masks."""
    new_t = (t + up.to(torch.int32) - down.to(torch.int32)).to(torch.int8)
    return pack_reference(new_t), (up | down).sum(dtype=torch.int64)


def ternary_update_reference(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                             grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int,
                             counter_bits: int = 8) -> Outputs:
    """Pure-torch counter rule (see the module docstring) on ``counter_bits``-bit counters (8, or 4 packed)."""
    check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold, counter_bits)
    packed, exp, t_accum, e_accum, grad = (x.contiguous() for x in (packed, exp, t_accum, e_accum, grad))
    th, nibbles = flip_threshold, counter_bits == 4
    t = unpack_reference(packed, k).to(torch.int32)
    s = _signs(grad)
    a = ((unpack_nibbles(t_accum, k) if nibbles else t_accum).to(torch.int32) - s).clamp(-th, th)
    up, down = (a >= th) & (t < 1), (a <= -th) & (t > -1)
    new_a = torch.where(up | down, 0, a)
    new_a = pack_nibbles(new_a) if nibbles else new_a.to(torch.int8)
    new_e, new_b, moves = _exponent_rule(t, s, exp, e_accum, k, group_size, exp_threshold)
    new_packed, flips = _moved(t, up, down)
    return new_packed, new_e, new_a, new_b, flips, moves


def ternary_update_stochastic_reference(packed: torch.Tensor, exp: torch.Tensor, e_accum: torch.Tensor,
                                        grad: torch.Tensor, step: torch.Tensor, cutoff: torch.Tensor, k: int,
                                        group_size: int, exp_threshold: int, seed: int) -> StochasticOutputs:
    """Pure-torch stochastic rule (see the module docstring)."""
    check_stochastic_args(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold, seed)
    packed, exp, e_accum, grad = (x.contiguous() for x in (packed, exp, e_accum, grad))
    t = unpack_reference(packed, k).to(torch.int32)
    s = _signs(grad)
    go = draws(step_key(step, seed), packed.shape[0], k) < cutoff
    up, down = go & (s < 0) & (t < 1), go & (s > 0) & (t > -1)
    new_e, new_b, moves = _exponent_rule(t, s, exp, e_accum, k, group_size, exp_threshold)
    new_packed, flips = _moved(t, up, down)
    return new_packed, new_e, new_b, flips, moves


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _sign_bits(g):
    """int32 sign of fp32 ``g`` from its sign bit where ``|g| > 0`` (false for zero and NaN): 0, -1 or +1."""
    return tl.where(tl.abs(g) > 0.0, (g.to(tl.int32, bitcast=True) >> 31) | 1, 0)


@triton.jit
def _sign_of(grad_ptr, offs, mask):
    """int32 sign of grad (0 for zero, NaN and masked lanes)."""
    return _sign_bits(tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _octet_grads(grad_ptr, base, row_ok, octets, K, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """fp32 gradients [BLOCK_R, BLOCK_O, 8] at ``base + j`` (column 8 * octet + j < K; 0 elsewhere), each thread
    holding whole octets: two [.., 4] loads (128 bits each) joined in registers."""
    i = tl.arange(0, 4)[None, None, :]
    lo_cols = octets[None, :, None] * 8 + i
    lo = tl.load(grad_ptr + base + i, mask=row_ok & (lo_cols < K), other=0.0).to(tl.float32)
    hi = tl.load(grad_ptr + base + 4 + i, mask=row_ok & (lo_cols + 4 < K), other=0.0).to(tl.float32)
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (BLOCK_R, BLOCK_O, 8))


@triton.jit
def _octet_signs(grad_ptr, base, row_ok, octets, K, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """int32 signs [BLOCK_R, BLOCK_O, 8] of :func:`_octet_grads`."""
    return _sign_bits(_octet_grads(grad_ptr, base, row_ok, octets, K, BLOCK_R, BLOCK_O))


@triton.jit
def _mix32u(x):
    """:func:`mix32` in uint32 arithmetic: products wrap mod 2**32 as the torch form's masks do."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _draws(step_ptr, SEED_HI, SEED_LO, offs):
    """The 24-bit draws (int32) of the weights at flat int32 offsets ``offs``: the stream key (:func:`step_key` of
    the step mod 2**32 and seed ``SEED_HI * 2**16 + SEED_LO``) and :func:`draws`, in uint32."""
    seed = (SEED_HI.to(tl.uint32) << 16) | SEED_LO.to(tl.uint32)
    key = _mix32u(tl.load(step_ptr).to(tl.uint32) * 0x61C88647 + seed)
    return (_mix32u(offs.to(tl.uint32) * 0x61C88647 + key) >> 8).to(tl.int32)


@triton.jit
def _stochastic_go(step_ptr, cut_ptr, SEED_HI, SEED_LO, offs):
    """Where the draw of each weight at flat int32 offsets ``offs`` (:func:`_draws`) falls below the cutoff,
    clamped to 0..2**24 (the draws' range, so the outcome is the reference's)."""
    cut = tl.minimum(tl.maximum(tl.load(cut_ptr), 0), 1 << 24).to(tl.int32)
    return _draws(step_ptr, SEED_HI, SEED_LO, offs) < cut


@triton.jit
def _drawn_move(t, s, go):
    """The stochastic flip of trits ``t`` by signs ``s`` where ``go``: the vote -s moves the trit one step unless it
    already sits at that bound (t = -s); -1, 0 or +1 (one compare and a select)."""
    return tl.where(go & (t + s != 0), -s, 0)


@triton.jit
def _counter_move(t, a, TH):
    """(move, new counter) of trits ``t`` whose counters, with this step's vote added, are ``a``: a counter clamped
    to ±TH that reaches a bound moves its trit that way (unless the trit sits there) and restarts at 0."""
    a = tl.minimum(tl.maximum(a, -TH), TH)
    full = (a >= TH).to(tl.int32) - (a <= -TH).to(tl.int32)  # a full counter's direction: -1, 0 or +1
    dt = tl.where(t != full, full, 0)
    return dt, tl.where(dt != 0, 0, a)


@triton.jit
def _move_exponents(score, q, qmask, exp_ptr, e_accum_ptr, new_exp_ptr, new_e_accum_ptr, THE):
    """The exponent rule for (row, group) indices ``q`` given each group's vote ``score`` (sum of sign * trit):
    writes the new exponents and accumulators; returns 1 where an exponent moved (0 where masked)."""
    e = tl.load(exp_ptr + q, mask=qmask, other=0).to(tl.int32)
    b = tl.load(e_accum_ptr + q, mask=qmask, other=0).to(tl.int32)
    b = tl.minimum(tl.maximum(b - ((score > 0).to(tl.int32) - (score < 0).to(tl.int32)), -THE), THE)
    inc = ((b >= THE) & (e < 127)).to(tl.int32)
    dec = ((b <= -THE) & (e > -128)).to(tl.int32)
    tl.store(new_exp_ptr + q, (e + inc - dec).to(tl.int8), mask=qmask)
    tl.store(new_e_accum_ptr + q, (b - THE * inc + THE * dec).to(tl.int8), mask=qmask)
    return tl.where(qmask, inc + dec, 0)


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
    moved = _move_exponents(score, q, qmask, exp_ptr, e_accum_ptr, new_exp_ptr, new_e_accum_ptr, THE)
    tl.store(count_ptr + pid, tl.sum(moved, axis=0))


_FLIP_CONFIGS = [triton.Config({"BLOCK_S": bs}, num_warps=w) for bs, w in ((128, 4), (64, 4), (256, 8), (128, 8))]


@autotuned(_FLIP_CONFIGS, key=["NQ", "K"], reset_to_zero=["count_ptr"])  # a larger tile writes fewer counts
@triton.jit(do_not_specialize=["NQ", "K", "KB", "KT", "QB", "TH", "SEED_HI", "SEED_LO"])  # one compile per mode
def _flip_kernel(packed_ptr, t_accum_ptr, grad_ptr, step_ptr, cut_ptr, new_packed_ptr, new_t_accum_ptr, count_ptr,
                 NQ, K, KB, KT, QB, TH, SEED_HI, SEED_LO, BLOCK_S: tl.constexpr, STOCHASTIC: tl.constexpr,
                 NIBBLES: tl.constexpr):
    """Counter flips (t_accum in and out, KT bytes per row: int8, or with NIBBLES 4-bit pairs; step, cutoff and
    seed unused), or with STOCHASTIC hashed flips (:func:`_stochastic_go`; TH and the t_accum pointers unused).

    A program takes BLOCK_S spans of two packed bytes (10 columns; QB spans per row) as a [BLOCK_S, 8, 2] tile
    whose digit d = 2p + r (valid below 10) is column 10 * span + d: gradients and int8 counters load and store
    contiguously along a row, a 4-bit counter byte is the pair (p, r = 0..1), and each new packed byte is one
    masked sum over the tile's digits of that byte."""
    pid = tl.program_id(0)
    q = pid * BLOCK_S + tl.arange(0, BLOCK_S)  # flat (row, span) index over N * QB
    qmask = q < NQ
    row, span = q // QB, q % QB
    p2 = tl.arange(0, 8)[None, :]  # [1, 8]: a pair of digits
    p = p2[:, :, None]
    r = tl.arange(0, 2)[None, None, :]
    d = 2 * p + r  # [1, 8, 2]: digit of the span
    cols = span[:, None, None] * 10 + d
    mask = qmask[:, None, None] & (d < 10) & (cols < K)
    rows3 = row[:, None, None]
    offs = rows3 * K + cols
    byte = tl.load(packed_ptr + rows3 * KB + cols // 5, mask=mask, other=121).to(tl.int32)
    t = trit_of(byte, cols)
    s = _sign_of(grad_ptr, offs, mask)
    if STOCHASTIC:
        dt = _drawn_move(t, s, _stochastic_go(step_ptr, cut_ptr, SEED_HI, SEED_LO, offs))
    else:
        if NIBBLES:  # counter byte span * 5 + p of the row holds columns 2p, 2p + 1 of the span
            hcol = span[:, None] * 5 + p2
            hoffs = row[:, None] * KT + hcol
            hmask = qmask[:, None] & (p2 < 5) & (hcol < KT)
            pair = tl.load(t_accum_ptr + hoffs, mask=hmask, other=0).to(tl.int32)  # widened before any bit op
            nib = (pair[:, :, None] >> (4 * r)) & 15
            a = tl.where(mask, nib - ((nib >> 3) << 4), 0) - s
        else:
            a = tl.load(t_accum_ptr + offs, mask=mask, other=0).to(tl.int32) - s
        dt, a = _counter_move(t, a, TH)
        if NIBBLES:  # a padding column's a is 0, so its nibble is written 0
            tl.store(new_t_accum_ptr + hoffs, tl.sum((a & 15) << (4 * r), axis=2).to(tl.uint8), mask=hmask)
        else:
            tl.store(new_t_accum_ptr + offs, a.to(tl.int8), mask=mask)
    place = tl.where(mask, t + dt + 1, 1) * pow3(d % 5)  # padding trits are written as zero (digit 1)
    first = tl.sum(tl.sum(tl.where(d < 5, place, 0), axis=2), axis=1)
    second = tl.sum(tl.sum(tl.where((d >= 5) & (d < 10), place, 0), axis=2), axis=1)
    b0 = span * 2
    tl.store(new_packed_ptr + row * KB + b0, first.to(tl.uint8), mask=qmask & (b0 < KB))
    tl.store(new_packed_ptr + row * KB + b0 + 1, second.to(tl.uint8), mask=qmask & (b0 + 1 < KB))
    flips = tl.sum(tl.sum(dt & 1, axis=2), axis=1)  # |dt|; 0 where masked (s = a = 0)
    tl.store(count_ptr + pid, tl.sum(flips, axis=0))


@triton.jit
def _add_to_byte(words, rn, q0, i: tl.constexpr, delta, row_ok, KB):
    """Atomically add ``delta`` [rows, octets] to byte ``q0 + i`` of each row (an int32 add on its aligned word;
    the byte's final value lies in 0..242, so a carry or borrow between partial adds cancels out)."""
    at = rn[:, None] * KB + q0[None, :] + i
    tl.atomic_add(words + (at >> 2), delta << ((at & 3) * 8), mask=row_ok[:, None] & (q0[None, :] + i < KB) & (delta != 0),
                  sem="relaxed")


@triton.jit
def _octet_tile(new_packed_ptr, N, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """(int32 view of ``new_packed_ptr``, program ids, rows, row mask, octets, column-in-octet index [1, 1, 8]) of
    this program's [BLOCK_R, BLOCK_O, 8] tile."""
    words = new_packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    pid_r, pid_o = tl.program_id(0), tl.program_id(1)
    rn = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    octets = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    return words, pid_r, pid_o, rn, rn < N, octets, tl.arange(0, 8)[None, None, :]


@triton.jit
def _add_octet_moves(words, rn, octets, dt, j, row_ok, KB):
    """Add each octet's trit moves ``dt`` [rows, octets, 8] (-1, 0, +1; column j of the octet at ``j``) to the
    packed bytes under it (``words``: the int32 view of a copy of the old bytes) by :func:`_add_to_byte`."""
    # column j of the octet is digit r0 + j of byte q0 when r0 + j < 5, digit r0 + j - 5 of byte q0 + 1 below 10,
    # else digit r0 + j - 10 of q0 + 2
    q0 = octets * 8 // 5
    r0 = octets * 8 - 5 * q0
    # the octet's moves as one integer, sum of moved_j * 3**(r0 + j) = d0 + 243 d1 + 59049 d2 with |d0|, |d1| <=
    # 121: the three byte deltas come back by rounded division (offsets keep the dividends >= 0)
    total = tl.sum(dt * tl.where(j < 5, pow3(j), 243 * pow3(j - 5)), axis=2) * pow3(r0)[None, :]
    d2 = (total + (29524 + 5 * 59049)) // 59049 - 5
    rest = total - 59049 * d2
    d1 = (rest + (121 + 121 * 243)) // 243 - 121
    _add_to_byte(words, rn, q0, 0, rest - 243 * d1, row_ok, KB)
    _add_to_byte(words, rn, q0, 1, d1, row_ok, KB)
    _add_to_byte(words, rn, q0, 2, d2, row_ok, KB)


_FUSED_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_O": o}, num_warps=w)  # one or two octets per thread: few
                  for r, o, w in ((1, 128, 4), (2, 128, 4), (1, 256, 4), (1, 128, 2))]  # registers (56-68 at the first)


@autotuned(_FUSED_CONFIGS, key=["N", "K", "GS"], reset_to_zero=["count_ptr", "exp_count_ptr"],
           restore_value=["new_packed_ptr"])  # the flips add into a copy of the old bytes: restore it after each timing
# K is specialized: its divisibility sets the vector width
@triton.jit(do_not_specialize=["N", "KB", "KT", "G", "TH", "THE", "SEED_HI", "SEED_LO"])
def _fused_kernel(packed_ptr, t_accum_ptr, grad_ptr, step_ptr, cut_ptr, exp_ptr, e_accum_ptr, new_packed_ptr,
                  new_t_accum_ptr, new_exp_ptr, new_e_accum_ptr, count_ptr, exp_count_ptr, N, K, KB, KT, G, TH, THE,
                  SEED_HI, SEED_LO, GS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
                  STOCHASTIC: tl.constexpr, NIBBLES: tl.constexpr):
    """Both rules in one pass over a [BLOCK_R rows, BLOCK_O octets, 8 columns] tile (GS a power of two from 8
    to 8 * BLOCK_O, so the tile holds whole groups): a thread's octet of gradients and counters loads and
    stores as vectors, its old trits come from :func:`kernels._triton.octet_trits` (digits by per-register
    constants), the exponent rule sums each group over its octets, and each flipped trit adds
    (t' - t) * 3**digit to its byte through an int32 atomic add on the aligned word that holds it
    (``new_packed_ptr``: 4-byte aligned, already a copy of the old bytes, with room after them). Integer adds
    commute, so the result does not depend on their order; flips are rare, so are the atomics. The programs
    of the last octet block also write each row's padding digits as zero trits."""
    NGB: tl.constexpr = BLOCK_O * 8 // GS  # groups per tile row
    words, pid_r, pid_o, rn, row_ok, octets, j = _octet_tile(new_packed_ptr, N, BLOCK_R, BLOCK_O)
    cols = octet_columns(octets)  # [1, BLOCK_O, 8]
    mask = row_ok[:, None, None] & (cols < K)
    offs = rn[:, None, None] * K + cols
    t = octet_trits(packed_ptr, rn, octets, row_ok[:, None] & (octets * 8 < K)[None, :], KB)
    # without the int8 counters' 8-wide load to anchor an octet per thread, fp32 gradients load 4 per thread (128
    # bits) and split each octet over two threads: load them as two 4-column halves joined in registers
    if STOCHASTIC or NIBBLES:
        s = _octet_signs(grad_ptr, rn[:, None, None] * K + octets[None, :, None] * 8, row_ok[:, None, None], octets, K,
                         BLOCK_R, BLOCK_O)
    else:
        s = _sign_of(grad_ptr, offs, mask)
    # exponent rule, per group of the tile, on the old trits
    # octet sums first, then groups of octets: summing a [BLOCK_R, NGB, GS] reshape of the tile gave wrong
    # scores on sm_90 with BLOCK_R = 2 (triton 3.6), right ones in the interpreter
    score = tl.sum(tl.reshape(tl.sum(s * t, axis=2), (BLOCK_R, NGB, GS // 8)), axis=2)
    g = pid_o * NGB + tl.arange(0, NGB)
    q = rn[:, None] * G + g[None, :]
    qmask = row_ok[:, None] & (g < G)[None, :]
    moved = _move_exponents(score, q, qmask, exp_ptr, e_accum_ptr, new_exp_ptr, new_e_accum_ptr, THE)
    pid = pid_r * tl.num_programs(1) + pid_o
    tl.store(exp_count_ptr + pid, tl.sum(tl.sum(moved, axis=1), axis=0))
    # flip rule
    if STOCHASTIC:
        dt = _drawn_move(t, s, _stochastic_go(step_ptr, cut_ptr, SEED_HI, SEED_LO, offs))
    else:
        if NIBBLES:  # counter byte c // 2 of the row: column c in the low nibble for even c, the high for odd
            hcol = octets[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]  # the octet's four counter bytes
            pair = tl.load(t_accum_ptr + rn[:, None, None] * KT + hcol, mask=row_ok[:, None, None] & (hcol < KT),
                           other=0).to(tl.int32)
            nib = tl.reshape(tl.join(pair & 15, pair >> 4), (BLOCK_R, BLOCK_O, 8))
            a = tl.where(mask, nib - ((nib >> 3) << 4), 0) - s
        else:
            a = tl.load(t_accum_ptr + offs, mask=mask, other=0).to(tl.int32) - s
        dt, a = _counter_move(t, a, TH)
        if NIBBLES:  # an octet's four counter bytes; a padding column's a is 0, so its nibble is written 0
            a4 = tl.reshape(a & 15, (BLOCK_R, BLOCK_O, 4, 2))
            pairs = tl.sum(a4 << (4 * tl.arange(0, 2)[None, None, None, :]), axis=3)
            tl.store(new_t_accum_ptr + rn[:, None, None] * KT + hcol, pairs.to(tl.uint8),
                     mask=row_ok[:, None, None] & (hcol < KT))
        else:
            tl.store(new_t_accum_ptr + offs, a.to(tl.int8), mask=mask)
    _add_octet_moves(words, rn, octets, dt, j, row_ok, KB)
    tl.store(count_ptr + pid, tl.sum(tl.sum(tl.sum(dt & 1, axis=2), axis=1), axis=0))  # |dt|, 0 where masked
    if pid_o == tl.num_programs(1) - 1:  # padding digits (columns K .. 5 KB - 1, at most 4) of these rows
        pc = K + tl.arange(0, 4)
        pmask = row_ok[:, None] & (pc[None, :] < 5 * KB)
        pat = rn[:, None] * KB + pc[None, :] // 5
        pbyte = tl.load(packed_ptr + pat, mask=pmask, other=121).to(tl.int32)
        pdelta = -trit_of(pbyte, pc[None, :]) * pow3(pc[None, :] % 5)  # to digit 1: the zero trit
        tl.atomic_add(words + (pat >> 2), pdelta << ((pat & 3) * 8), mask=pmask & (pdelta != 0), sem="relaxed")


def fuses(group_size: int) -> bool:
    """Whether one fused kernel runs the update: group sizes that are powers of two from 8 to 64 (a tile row of
    the smallest config holds whole groups); others run the exponent and flip kernels."""
    return group_size in (8, 16, 32, 64)


_EXP_TILE = 4096  # elements per exponent program (BLOCK_Q * GS_P2)


Stream = tuple[torch.Tensor, torch.Tensor, int]  # (step, cutoff, seed) of stochastic flips


def _stream_args(stream: Stream | None) -> tuple:
    """The kernels' (step, cutoff, seed high 16 bits, seed low 16 bits) arguments; unused zeros for counters
    (the seed goes in halves: an int argument of 2**31 or more would compile as int64)."""
    if stream is None:
        return None, None, 0, 0
    step, cutoff, seed = stream
    return step, cutoff, seed >> 16, seed & 0xFFFF


def launch_update(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor | None, e_accum: torch.Tensor,
                  grad: torch.Tensor, stream: Stream | None, k: int, group_size: int, flip_threshold: int,
                  exp_threshold: int, counter_bits: int = 8) -> Outputs:
    """The update's kernels (fused, or exponent and flip) on contiguous, checked inputs; ``stream`` selects
    stochastic flips (t_accum' is then None, ``flip_threshold`` unused), else counter flips on ``counter_bits``-bit
    counters."""
    n, kb, g = packed.shape[0], packed_width(k), n_groups(k, group_size)
    new_packed = packed.new_empty(packed.shape)
    new_t_accum = None if t_accum is None else t_accum.new_empty(t_accum.shape)
    new_exp, new_e_accum = exp.new_empty(exp.shape), e_accum.new_empty(e_accum.shape)
    if n == 0:
        zero = torch.zeros((), dtype=torch.int64, device=packed.device)
        return new_packed, new_exp, new_t_accum, new_e_accum, zero, zero.clone()
    if fuses(group_size):
        return _launch_fused(packed, exp, t_accum, e_accum, grad, stream, k, group_size, flip_threshold,
                             exp_threshold, counter_bits, new_t_accum, new_exp, new_e_accum)
    gs_p2 = triton.next_power_of_2(group_size)
    block_q = min(_EXP_TILE // gs_p2, triton.next_power_of_2(n * g))
    exp_counts = torch.empty(cdiv(n * g, block_q), dtype=torch.int32, device=packed.device)
    _exp_update_kernel[(exp_counts.numel(),)](packed, exp, e_accum, grad, new_exp, new_e_accum, exp_counts, n * g,
                                              k, kb, g, exp_threshold, GS=group_size, GS_P2=gs_p2, BLOCK_Q=block_q)
    qb = cdiv(kb, 2)  # spans of two packed bytes per row
    # one count per program of the smallest tile any config uses; programs of a larger tile leave the rest 0
    flip_counts = torch.zeros(cdiv(n * qb, min(c.kwargs["BLOCK_S"] for c in _FLIP_CONFIGS)), dtype=torch.int32,
                              device=packed.device)
    step, cutoff, seed_hi, seed_lo = _stream_args(stream)
    _flip_kernel[lambda m: (cdiv(n * qb, m["BLOCK_S"]),)](
        packed, t_accum, grad, step, cutoff, new_packed, new_t_accum, flip_counts, n * qb, k, kb,
        counter_layout(k, counter_bits)[1], qb, flip_threshold, seed_hi, seed_lo, STOCHASTIC=stream is not None,
        NIBBLES=stream is None and counter_bits == 4)
    return (new_packed, new_exp, new_t_accum, new_e_accum,
            flip_counts.sum(dtype=torch.int64), exp_counts.sum(dtype=torch.int64))


def fused_tiles(n: int, k: int) -> int:
    """Count slots the fused kernel writes for an [n, k] weight: one per program of the config with the most."""
    return max(cdiv(n, c.kwargs["BLOCK_R"]) * cdiv(cdiv(k, 8), c.kwargs["BLOCK_O"]) for c in _FUSED_CONFIGS)


def _aligned_copy(packed: torch.Tensor) -> torch.Tensor:
    """A copy of ``packed`` at a 4-byte aligned address with room after it for the fused kernel's last word."""
    buf = torch.empty(packed.numel() + 8, dtype=torch.uint8, device=packed.device)
    start = -buf.data_ptr() % 4
    new_packed = buf[start:start + packed.numel()].view(packed.shape)
    new_packed.copy_(packed)
    return new_packed


def launch_fused_into(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor | None, e_accum: torch.Tensor,
                      grad: torch.Tensor, stream: Stream | None, k: int, group_size: int, flip_threshold: int,
                      exp_threshold: int, counter_bits: int, new_packed: torch.Tensor, new_t_accum: torch.Tensor | None,
                      new_exp: torch.Tensor, new_e_accum: torch.Tensor, counts: torch.Tensor) -> None:
    """The fused kernel on contiguous, checked inputs (``fuses(group_size)``), writing the given outputs:
    ``new_packed`` holds a copy of the old bytes at a 4-byte aligned address with 3 bytes of room after it and
    takes each flip's byte delta; ``counts`` is an int32 [2, >= fused_tiles(n, k)] of zeros that takes each
    program's flips (row 0) and exponent moves (row 1)."""
    n, kb, g = packed.shape[0], packed_width(k), n_groups(k, group_size)
    n_octets = cdiv(k, 8)
    step, cutoff, seed_hi, seed_lo = _stream_args(stream)
    _fused_kernel[lambda m: (cdiv(n, m["BLOCK_R"]), cdiv(n_octets, m["BLOCK_O"]))](
        packed, t_accum, grad, step, cutoff, exp, e_accum, new_packed, new_t_accum, new_exp, new_e_accum, counts[0],
        counts[1], n, k, kb, counter_layout(k, counter_bits)[1], g, flip_threshold, exp_threshold, seed_hi, seed_lo,
        GS=group_size, STOCHASTIC=stream is not None, NIBBLES=stream is None and counter_bits == 4)


def _launch_fused(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor | None, e_accum: torch.Tensor,
                  grad: torch.Tensor, stream: Stream | None, k: int, group_size: int, flip_threshold: int,
                  exp_threshold: int, counter_bits: int, new_t_accum: torch.Tensor | None, new_exp: torch.Tensor,
                  new_e_accum: torch.Tensor) -> Outputs:
    """:func:`launch_fused_into` on a fresh aligned copy of the packed bytes and fresh counts."""
    new_packed = _aligned_copy(packed)
    counts = torch.zeros((2, fused_tiles(packed.shape[0], k)), dtype=torch.int32, device=packed.device)
    launch_fused_into(packed, exp, t_accum, e_accum, grad, stream, k, group_size, flip_threshold, exp_threshold,
                      counter_bits, new_packed, new_t_accum, new_exp, new_e_accum, counts)
    # two separate sums: views of one tensor would alias the op's outputs
    return (new_packed, new_exp, new_t_accum, new_e_accum, counts[0].sum(dtype=torch.int64),
            counts[1].sum(dtype=torch.int64))


def ternary_update_triton(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                          grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int,
                          counter_bits: int = 8) -> Outputs:
    """Launch the exponent and counter-flip kernels (CUDA, or CPU under the interpreter) on ``counter_bits``-bit
    counters (8, or 4 packed)."""
    check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold, counter_bits)
    check_launchable(packed, exp, t_accum, e_accum, grad)
    inputs = (x.contiguous() for x in (packed, exp, t_accum, e_accum, grad))
    return launch_update(*inputs, None, k, group_size, flip_threshold, exp_threshold, counter_bits)


def ternary_update_stochastic_triton(packed: torch.Tensor, exp: torch.Tensor, e_accum: torch.Tensor,
                                     grad: torch.Tensor, step: torch.Tensor, cutoff: torch.Tensor, k: int,
                                     group_size: int, exp_threshold: int, seed: int) -> StochasticOutputs:
    """Launch the exponent and stochastic-flip kernels (CUDA, or CPU under the interpreter): no torch op runs
    per call beyond the outputs' allocation and counts, the kernels hash the step themselves."""
    check_stochastic_args(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold, seed)
    check_launchable(packed, exp, e_accum, grad, step, cutoff)
    packed, exp, e_accum, grad = (x.contiguous() for x in (packed, exp, e_accum, grad))
    new_packed, new_exp, _, new_e_accum, flips, moves = launch_update(
        packed, exp, None, e_accum, grad, (step, cutoff, seed), k, group_size, 0, exp_threshold)
    return new_packed, new_exp, new_e_accum, flips, moves


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::ternary_update", mutates_args=())
def ternary_update(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                   grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sign-vote step with counter flips: (packed', exp', t_accum', e_accum', flips, exp_moves)."""
    return ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)


@ternary_update.register_kernel("cuda")
def _(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold):
    return ternary_update_triton(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold)


def _counts_like(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed.new_empty((), dtype=torch.int64), packed.new_empty((), dtype=torch.int64)


def _counter_fake(counter_bits: int):
    """The fake (shapes and checks only) of the counter op on ``counter_bits``-bit counters."""

    def fake(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold):
        check_update_args(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold,
                          counter_bits)
        return (packed.new_empty(packed.shape), exp.new_empty(exp.shape), t_accum.new_empty(t_accum.shape),
                e_accum.new_empty(e_accum.shape), *_counts_like(packed))

    return fake


ternary_update.register_fake(_counter_fake(8))


@torch.library.custom_op("arbfn::ternary_update_nibble", mutates_args=())
def ternary_update_nibble(packed: torch.Tensor, exp: torch.Tensor, t_accum: torch.Tensor, e_accum: torch.Tensor,
                          grad: torch.Tensor, k: int, group_size: int, flip_threshold: int, exp_threshold: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """``ternary_update`` on 4-bit counters packed two per byte (t_accum uint8 [N, ceil(k/2)], θ <= 7)."""
    return ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold,
                                    counter_bits=4)


@ternary_update_nibble.register_kernel("cuda")
def _(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold):
    return ternary_update_triton(packed, exp, t_accum, e_accum, grad, k, group_size, flip_threshold, exp_threshold,
                                 counter_bits=4)


ternary_update_nibble.register_fake(_counter_fake(4))


@torch.library.custom_op("arbfn::ternary_update_stochastic", mutates_args=())
def ternary_update_stochastic(packed: torch.Tensor, exp: torch.Tensor, e_accum: torch.Tensor, grad: torch.Tensor,
                              step: torch.Tensor, cutoff: torch.Tensor, k: int, group_size: int, exp_threshold: int,
                              seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sign-vote step with counter-free hashed flips: (packed', exp', e_accum', flips, exp_moves); ``cutoff``
    is :func:`flip_cutoff` of the step."""
    return ternary_update_stochastic_reference(packed, exp, e_accum, grad, step, cutoff, k, group_size,
                                               exp_threshold, seed)


@ternary_update_stochastic.register_kernel("cuda")
def _(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold, seed):
    return ternary_update_stochastic_triton(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold,
                                            seed)


@ternary_update_stochastic.register_fake
def _(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold, seed):
    check_stochastic_args(packed, exp, e_accum, grad, step, cutoff, k, group_size, exp_threshold, seed)
    return packed.new_empty(packed.shape), exp.new_empty(exp.shape), e_accum.new_empty(e_accum.shape), \
        *_counts_like(packed)
