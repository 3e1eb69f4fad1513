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
    """An fp32 value at most 2**-24 (relative) from ``3**-r``, for r in 0..5 (int, constexpr or tensor): with
    :func:`round_floor` it gives exact ``floor(b / 3**r)`` for every byte 0..242."""
    return tl.where(r == 0, 1.0, tl.where(r == 1, 0.3333333432674408, tl.where(r == 2, 0.1111111119389534, tl.where(
        r == 3, 0.03703703731298447, tl.where(r == 4, 0.012345679104328156, 0.004115226212888956)))))


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
def trit_float(byte, r, ON_FLOAT: tl.constexpr):
    """Trit (-1., 0., +1.) of digit ``r`` (int32, 0..4, per element or broadcast) of ``byte`` (int32 0..242) as an
    exact fp32, with no int-to-float conversion: on the integer pipe the digit by multiply-shift, turned into
    a float through the mantissa of 2**23; on the float pipe two exact floors, ``f_r - 3 f_(r+1) - 1``."""
    if ON_FLOAT:
        bf = (byte | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        t = round_floor(bf * inv3_float(r)) - (round_floor(bf * inv3_float(r + 1)) * 3.0 + 1.0)
    else:
        q = (byte * inv_pow3(r)) >> 16
        t = ((q - 3 * div3(q)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0
    return t


@triton.jit
def pow2_exact(e):
    """``2**e`` as fp32 for int32 e in -128..127, built from the bits of two normal halves: exact (the
    subnormal 2**-127 and 2**-128 included) and a few integer ops where ``exp2`` costs a special-function
    unit slot and an int-to-float conversion per element."""
    lo = e >> 1
    hi = e - lo
    return ((lo + 127) << 23).to(tl.float32, bitcast=True) * ((hi + 127) << 23).to(tl.float32, bitcast=True)


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
    """Launches a kernel with the first of its tuning configs (interpreter runs: timing them means nothing)."""

    def __init__(self, fn, configs: list[triton.Config]) -> None:
        self.fn, self.configs, self.config = fn, configs, configs[0]

    def __getitem__(self, grid):
        meta = dict(self.config.kwargs)
        return lambda *args, **kwargs: self.fn[grid(meta) if callable(grid) else grid](*args, **kwargs, **meta)


def autotuned(configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None):
    """``triton.autotune`` over ``configs`` per distinct ``key`` values, results cached on disk
    (``cache_results``): a shape is tuned once, at its first launch, never at import. Under the
    interpreter, or with ``ARBFN_AUTOTUNE=0`` (GPU test runs over hundreds of random shapes), the first
    config runs untimed. Grids must be callables of the chosen meta-parameters. Either way the result has
    ``.fn`` (the plain kernel) and ``.configs``, so tests can run every config the tuner may pick.
    ``reset_to_zero`` names output arguments the tuner zeroes before each timed run and before the real one
    (outputs that a config's grid writes only in part, so that a timed run's leftovers cannot stay)."""
    def wrap(fn):
        if interpreting() or os.environ.get("ARBFN_AUTOTUNE", "1") == "0":
            return _FirstConfig(fn, configs)
        return triton.autotune(configs=configs, key=key, cache_results=True, reset_to_zero=reset_to_zero)(fn)
    return wrap


@triton.jit
def decode_tile(packed_ptr, exp_ptr, rows, cols, row_mask, K, KB, G, GS: tl.constexpr, ON_FLOAT: tl.constexpr):
    """fp32 tile ``T[rows, cols] * 2**E[rows, cols // GS]``; zero where masked. ``rows``/``cols`` are 1-D;
    ``ON_FLOAT`` picks :func:`trit_float`'s pipe (a tuning choice, the values are the same)."""
    mask = row_mask[:, None] & (cols[None, :] < K)
    byte = tl.load(packed_ptr + rows[:, None] * KB + (cols // 5)[None, :], mask=mask, other=121).to(tl.int32)
    e = tl.load(exp_ptr + rows[:, None] * G + (cols // GS)[None, :], mask=mask, other=0).to(tl.int32)
    return trit_float(byte, (cols % 5)[None, :], ON_FLOAT) * pow2_exact(e)
