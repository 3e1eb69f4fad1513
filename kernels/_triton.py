"""Shared Triton helpers: the base-3 digit decode every packed kernel uses, and launch utilities.

Triton is imported here once. Tests that run kernels on CPU set ``TRITON_INTERPRET=1`` *before*
anything imports this module (see tests/conftest.py); production CPU dispatch never launches a
kernel, it calls the pure-torch reference.
"""

from __future__ import annotations

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
def trit_of(byte, k):
    """Trit (-1, 0, +1) at logical column ``k`` given the packed byte that holds it (both int32)."""
    return ((byte * inv_pow3(k % 5)) >> 16) % 3 - 1


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests only)."""
    import os

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


@triton.jit
def decode_tile(packed_ptr, exp_ptr, rows, cols, row_mask, K, KB, G, GS: tl.constexpr):
    """fp32 tile ``T[rows, cols] * 2**E[rows, cols // GS]``; zero where masked. ``rows``/``cols`` are 1-D."""
    mask = row_mask[:, None] & (cols[None, :] < K)
    byte = tl.load(packed_ptr + rows[:, None] * KB + (cols // 5)[None, :], mask=mask, other=121).to(tl.int32)
    e = tl.load(exp_ptr + rows[:, None] * G + (cols // GS)[None, :], mask=mask, other=0).to(tl.float32)
    return trit_of(byte, cols[None, :]).to(tl.float32) * tl.exp2(e)
