"""Shared Triton helpers: the base-3 digit decode every packed kernel uses, and launch utilities.

Triton is imported here once. Tests that run kernels on CPU set ``TRITON_INTERPRET=1`` *before*
anything imports this module (see tests/conftest.py); production CPU dispatch never launches a
kernel, it calls the pure-torch reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TRITS_PER_BYTE = 5
MAX_VALID_BYTE = 242  # 3**5 - 1
PAD_BYTE = 121  # all five digits = 1, i.e. five zero trits


@triton.jit
def inv_pow3(r):
    """ceil(2**16 / 3**r) for r in 0..4: ``(byte * inv_pow3(r)) >> 16 == byte // 3**r`` exactly for 0 <= byte < 256,
    a multiply and a shift where a division by a per-column divisor would cost dozens of instructions."""
    return tl.where(r == 0, 65536, tl.where(r == 1, 21846, tl.where(r == 2, 7282, tl.where(r == 3, 2428, 810))))


@triton.jit
def div3(q):
    """``q // 3`` for int32 0 <= q < 256 as a multiply and a shift (171 / 512 errs by < 1/6 there)."""
    return (q * 171) >> 9


@triton.jit
def trit_of(byte, k):
    """Trit (-1, 0, +1) at logical column ``k`` given the packed byte that holds it (both int32)."""
    q = (byte * inv_pow3(k % 5)) >> 16
    return q - 3 * div3(q) - 1


_FLOOR_BIAS = tl.constexpr(1 / 256 - 0.5)  # floor(z) = round(z + bias) for z = b / 3**d (fractions are j / 81)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds any |v| < 2**22 to an integer (ulp 1)


@triton.jit
def inv3_float(r):
    """The fp32 nearest ``3**-r`` (at most 2**-24 from it, relative), for r in 0..8 (int, constexpr or tensor): with
    :func:`round_floor` it gives exact ``floor(b / 3**r)`` for every byte 0..242, with
    :func:`floor_div_pow3_wide` exact ``floor(v / 3**r)`` for every ``v < 3**12``."""
    return tl.where(r == 0, 1.0, tl.where(r == 1, 0.3333333432674408, tl.where(r == 2, 0.1111111119389534, tl.where(
        r == 3, 0.03703703731298447, tl.where(r == 4, 0.012345679104328156, tl.where(r == 5, 0.004115226212888956,
        tl.where(r == 6, 0.0013717421097680926, tl.where(r == 7, 0.00045724736992269754, 0.0001524157851235941))))))))


@triton.jit
def round_floor(z):
    """``floor(z)`` for ``z = b * inv3_float(r)``, whose fractional parts are multiples of 1/243 or just above: add
    the bias, and the magic number rounds to an integer (exact, float pipe only)."""
    return (z + _FLOOR_BIAS + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def floor_div_pow3(b, bf, d: tl.constexpr, ON_FLOAT: tl.constexpr):
    """``floor(b / 3**d)`` as an exact float for 0 <= b < 243 and d = 0..4 (``bf`` = float(b)). Integer pipe:
    the float ``u`` whose mantissa bits 16..22 hold ``(b * ceil(2**16 / 3**d)) >> 16`` is ``1 + f / 128``;
    float pipe: :func:`round_floor`. Both are exact for every byte (tests/kernels/test_packing.py checks all 243)."""
    if d == 0:
        f = bf
    elif ON_FLOAT:
        f = round_floor(bf * inv3_float(d))
    else:
        u = (((b * inv_pow3(d)) & 0x7F0000) | 0x3F800000).to(tl.float32, bitcast=True)
        f = u * 128.0 - 128.0
    return f


@triton.jit
def trit_float(byte, r):
    """Trit (-1., 0., +1.) of digit ``r`` (int32, 0..4, per element or broadcast) of ``byte`` (int32 0..242) as an
    exact fp32 with no int-to-float conversion: the digit by multiply-shift, turned into a float through the
    mantissa of 2**23."""
    q = (byte * inv_pow3(r)) >> 16
    return ((q - 3 * div3(q)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0


@triton.jit
def pow2_halves(e):
    """Two normal fp32 powers of two whose product is ``2**e`` for int32 e in -128..127 (built from bits)."""
    lo = e >> 1
    return ((lo + 127) << 23).to(tl.float32, bitcast=True), ((e - lo + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_exact(e):
    """``2**e`` as fp32 for int32 e in -128..127, the product of :func:`pow2_halves`: exact (the subnormal
    2**-127 and 2**-128 included) and a few integer ops where ``exp2`` costs a special-function unit slot and
    an int-to-float conversion per element."""
    lo, hi = pow2_halves(e)
    return lo * hi


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Refuse to launch a compiled kernel on CPU tensors (a clear error instead of a driver crash)."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton); "
                f"got a tensor on {t.device}. CPU code should call the op, which dispatches to the reference."
            )


cdiv = triton.cdiv


class _FirstConfig:
    """Launches a kernel with the first of its tuning configs, launch options included (interpreter runs:
    timing them means nothing)."""

    def __init__(self, fn, configs: list[triton.Config]) -> None:
        self.fn, self.configs, self.config = fn, configs, configs[0]

    def __getitem__(self, grid):
        meta = self.config.all_kwargs()  # its meta-parameters and its launch options (warps, stages, registers)
        return lambda *args, **kwargs: self.fn[grid(meta) if callable(grid) else grid](*args, **kwargs, **meta)


def autotuned(configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None,
              restore_value: list[str] | None = None):
    """``triton.autotune`` over ``configs`` per distinct ``key`` values, results cached on disk
    (``cache_results``): a shape is tuned once, at its first launch, never at import. Under the
    interpreter, or with ``ARBFN_AUTOTUNE=0`` (GPU test runs over hundreds of random shapes), the first
    config runs untimed. Grids must be callables of the chosen meta-parameters. Either way the result has
    ``.fn`` (the plain kernel), ``.configs``, and the ``reset_to_zero`` and ``restore_value`` lists, so tests can
    run every config the tuner may pick and check what it protects.
    The tuner times each config by running it on the real arguments, several times, before the real launch.
    ``reset_to_zero`` names output arguments it zeroes before each timed run and before the real one (outputs
    that a config's grid writes only in part, so that a timed run's leftovers cannot stay); ``restore_value``
    names arguments it saves before timing and restores after each timed run: any output a kernel adds into
    (atomics on an initialised buffer), which every timed run would otherwise add into again."""
    def wrap(fn):
        if interpreting() or os.environ.get("ARBFN_AUTOTUNE", "1") == "0":
            tuned = _FirstConfig(fn, configs)
        else:
            tuned = triton.autotune(configs=configs, key=key, cache_results=True, reset_to_zero=reset_to_zero,
                                    restore_value=restore_value)(fn)
        tuned.protected = {"reset_to_zero": list(reset_to_zero or []), "restore_value": list(restore_value or [])}
        return tuned
    return wrap


@triton.jit
def decode_tile(packed_ptr, exp_ptr, rows, cols, row_mask, K, KB, G, GS: tl.constexpr):
    """fp32 tile ``T[rows, cols] * 2**E[rows, cols // GS]``; zero where masked. ``rows``/``cols`` are 1-D (one
    digit per element: for short rows such as a norm's gain; whole matrices use :func:`decode_octets`)."""
    mask = row_mask[:, None] & (cols[None, :] < K)
    byte = tl.load(packed_ptr + rows[:, None] * KB + (cols // 5)[None, :], mask=mask, other=121).to(tl.int32)
    e = tl.load(exp_ptr + rows[:, None] * G + (cols // GS)[None, :], mask=mask, other=0).to(tl.int32)
    return trit_float(byte, (cols % 5)[None, :]) * pow2_exact(e)


@triton.jit
def pow3(r):
    """3**r for int32 r in 0..5 (a select chain): place values of a packed byte's digits, and beyond."""
    return tl.where(r < 2, 1 + 2 * r, tl.where(r == 2, 9, tl.where(r == 3, 27, tl.where(r == 4, 81, 243))))


@triton.jit
def octet_value(packed_ptr, rows, octets, ok, KB):
    """The exact float ``v`` [rows, octets] whose base-3 digit j (``floor(v / 3**j) - 3 floor(v / 3**(j + 1))``,
    see :func:`floor_div_pow3_wide`) is trit + 1 of column ``8 * octet + j``, where ``ok`` holds (unspecified
    elsewhere). The eight columns come from the (at most) three bytes under them: ``v = floor(b0 / 3**r0) +
    3**(5 - r0) * (b1 + 243 * b2)`` with r0 the first column's digit, so ``v < 3**12``. A thread holding an
    octet's eight columns in registers gets each digit from a few float ops with a per-register constant: no
    per-column index math or byte load."""
    q0 = octets * 8 // 5
    r0 = octets * 8 - 5 * q0
    base = rows[:, None] * KB + q0[None, :]
    b0 = tl.load(packed_ptr + base, mask=ok, other=0).to(tl.int32)
    b1 = tl.load(packed_ptr + base + 1, mask=ok & (q0 + 1 < KB)[None, :], other=0).to(tl.int32)
    b2 = tl.load(packed_ptr + base + 2, mask=ok & (q0 + 2 < KB)[None, :] & (r0 >= 3)[None, :], other=0).to(tl.int32)
    v = (b0 * inv_pow3(r0)[None, :] >> 16) + pow3(5 - r0)[None, :] * (b1 + 243 * b2)
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def octet_trits(packed_ptr, rows, octets, ok, KB):
    """int32 trits [rows, octets, 8] (-1, 0, +1) of columns ``8 * octet + j`` from :func:`octet_value` (unspecified
    where ``ok`` fails)."""
    vf = octet_value(packed_ptr, rows, octets, ok, KB)[:, :, None]
    j = tl.arange(0, 8)[None, None, :]
    return (floor_div_pow3_wide(vf, j) - floor_div_pow3_wide(vf, j + 1) * 3.0).to(tl.int32) - 1


@triton.jit
def octet_columns(octets):
    """Columns [1, octets, 8] of a 1-D block of octets: ``8 * octet + j``, j in registers."""
    return octets[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]


@triton.jit
def decode_octets(packed_ptr, exp_ptr, rows, octets, row_mask, K, KB, G, GS: tl.constexpr):
    """fp32 tile [rows, octets, 8] of ``T * 2**E`` at columns ``8 * octet + j`` (unspecified where masked: callers
    mask their stores), from :func:`octet_value`: a thread's octet is one 16-byte bf16 store."""
    vf = octet_value(packed_ptr, rows, octets, row_mask[:, None] & (octets * 8 < K)[None, :], KB)[:, :, None]
    j = tl.arange(0, 8)[None, None, :]
    digits = floor_div_pow3_wide(vf, j) - floor_div_pow3_wide(vf, j + 1) * 3.0
    cols = octet_columns(octets)
    e = tl.load(exp_ptr + rows[:, None, None] * G + cols // GS, mask=row_mask[:, None, None] & (cols < K),
                other=0).to(tl.int32)
    half_lo, half_hi = pow2_halves(e)  # (digit - 1) * half_lo cannot overflow, and times half_hi is exact
    return (digits * half_lo - half_lo) * half_hi


@triton.jit
def floor_div_pow3_wide(vf, j):
    """``floor(v / 3**j)`` for exact floats ``0 <= v < 3**12`` and j in 0..8 (int, per element or broadcast):
    ``v * 3**-j`` errs by at most ``1.5 * 3**12 * 2**-23 / 3**j``, a fifth of the gap ``1 / 3**j`` between
    fractions, so rounding ``v * 3**-j + (1 / 3**j - 1) / 2`` to the nearest integer (the magic number) is
    exact (tests/kernels/test_packing.py checks every v and j)."""
    inv = inv3_float(j)
    return (vf * inv + (0.5 * inv - 0.5) + _ROUND_MAGIC) - _ROUND_MAGIC
