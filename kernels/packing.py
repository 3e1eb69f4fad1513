"""The packed ternary format: 5 trits per uint8 in base 3, and an int8 log2 scale per group.

byte = sum_{i<5} (t_i + 1) * 3**i for the trits t_0..t_4 of logical columns 5b..5b+4; a row's last
byte is padded with zero trits (digit 1). Valid bytes are 0..242; 243..255 are rejected wherever packed
data enters from outside. ``W[n, k] = T[n, k] * 2**E[n, k // group_size]``.

Ops: ``arbfn::pack`` (int8 trits -> uint8 bytes) and ``arbfn::unpack`` (bytes -> int8 trits), each a
Triton kernel on CUDA and a pure-torch reference on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import MAX_VALID_BYTE, PAD_BYTE, TRITS_PER_BYTE, cdiv, check_launchable, trit_of

MIN_GROUP_SIZE, MAX_GROUP_SIZE = 4, 96
_POW3 = (1, 3, 9, 27, 81)


def packed_width(k: int) -> int:
    """Bytes per packed row of ``k`` trits."""
    return -(-k // TRITS_PER_BYTE)


def n_groups(k: int, group_size: int) -> int:
    """Scale groups per row of ``k`` weights."""
    return -(-k // group_size)


def check_group_size(group_size: int) -> None:
    """Group sizes 4..96 are supported (the E1TM<gs> family)."""
    if not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be in {MIN_GROUP_SIZE}..{MAX_GROUP_SIZE}, got {group_size}")


def validate_packed(packed: torch.Tensor, k: int | None = None) -> None:
    """Raise ValueError unless ``packed`` is a 2-D uint8 tensor of valid bytes (0..242) and, given ``k``, of width ceil(k/5)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed trits must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if k is not None and packed.shape[1] != packed_width(k):
        raise ValueError(f"packed rows of {k} trits need {packed_width(k)} bytes, got {packed.shape[1]}")
    bad = packed > MAX_VALID_BYTE
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"packed trits hold {int(bad.sum())} invalid byte(s) (> {MAX_VALID_BYTE}); first at [{row}, {col}] = "
            f"{int(packed[row, col])}: base-3 packing allows only 0..{MAX_VALID_BYTE}"
        )
    if k is not None and k % TRITS_PER_BYTE and packed.numel():
        pad_digits = (packed[:, -1].to(torch.int32) // _POW3[k % TRITS_PER_BYTE]) != PAD_BYTE // _POW3[k % TRITS_PER_BYTE]
        if bool(pad_digits.any()):
            raise ValueError(f"packed rows of {k} trits must pad their last byte with zero trits")


def validate_trits(trits: torch.Tensor) -> None:
    """Raise ValueError unless ``trits`` is a 2-D int8 tensor of values in {-1, 0, +1}."""
    if trits.dtype != torch.int8 or trits.dim() != 2:
        raise ValueError(f"trits must be a 2-D int8 tensor, got {trits.dtype} of shape {tuple(trits.shape)}")
    if bool(((trits < -1) | (trits > 1)).any()):
        raise ValueError("trits must be in {-1, 0, +1}")


# ---------------------------------------------------------------- references (CPU path, test oracle)


def unpack_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Pure-torch unpack: uint8 [N, ceil(k/5)] -> int8 [N, k]."""
    cols = torch.arange(k, device=packed.device)
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)[cols % TRITS_PER_BYTE]
    byte = packed.to(torch.int32)[:, cols // TRITS_PER_BYTE]
    return ((byte // pow3) % 3 - 1).to(torch.int8)


def pack_reference(trits: torch.Tensor) -> torch.Tensor:
    """Pure-torch pack: int8 [N, k] in {-1,0,1} -> uint8 [N, ceil(k/5)], zero-trit padded."""
    n, k = trits.shape
    kb = packed_width(k)
    digits = torch.nn.functional.pad(trits.to(torch.int32) + 1, (0, kb * TRITS_PER_BYTE - k), value=1)
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=trits.device)
    return (digits.view(n, kb, TRITS_PER_BYTE) * pow3).sum(-1).to(torch.uint8)


def decode_reference(packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Dense ``T * 2**E`` as ``dtype`` [N, k]; for references, tests and tiny parameters only."""
    cols = torch.arange(k, device=packed.device)
    scale = torch.exp2(exp.to(torch.float32)[:, cols // group_size])
    return (unpack_reference(packed, k).to(torch.float32) * scale).to(dtype)


# ---------------------------------------------------------------- Triton kernels


@triton.jit(do_not_specialize=["K", "KB"])  # sizes vary per call: one compile, not one per size
def _unpack_kernel(packed_ptr, out_ptr, K, KB, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    byte = tl.load(packed_ptr + row * KB + cols // 5, mask=mask, other=121).to(tl.int32)
    tl.store(out_ptr + row * K + cols, trit_of(byte, cols).to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["K", "KB"])  # sizes vary per call: one compile, not one per size
def _pack_kernel(trits_ptr, out_ptr, K, KB, BLOCK_B: tl.constexpr):
    row = tl.program_id(0)
    bcols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    byte = tl.zeros((BLOCK_B,), tl.int32)
    weight = 1
    for i in tl.static_range(5):
        cols = bcols * 5 + i
        t = tl.load(trits_ptr + row * K + cols, mask=cols < K, other=0).to(tl.int32)
        byte += (t + 1) * weight
        weight *= 3
    tl.store(out_ptr + row * KB + bcols, byte.to(tl.uint8), mask=bcols < KB)


def unpack_triton(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Launch the unpack kernel (CUDA, or CPU under the interpreter)."""
    check_launchable(packed)
    packed = packed.contiguous()
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=torch.int8, device=packed.device)
    if out.numel():
        _unpack_kernel[(n, cdiv(k, 1024))](packed, out, k, packed.shape[1], BLOCK_K=1024)
    return out


def pack_triton(trits: torch.Tensor) -> torch.Tensor:
    """Launch the pack kernel (CUDA, or CPU under the interpreter)."""
    check_launchable(trits)
    trits = trits.contiguous()
    n, k = trits.shape
    kb = packed_width(k)
    out = torch.empty((n, kb), dtype=torch.uint8, device=trits.device)
    if out.numel():
        _pack_kernel[(n, cdiv(kb, 256))](trits, out, k, kb, BLOCK_B=256)
    return out


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::unpack", mutates_args=())
def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Packed uint8 [N, ceil(k/5)] -> int8 trits [N, k]."""
    return unpack_reference(packed, k)


@unpack.register_kernel("cuda")
def _(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_triton(packed, k)


@unpack.register_fake
def _(packed: torch.Tensor, k: int) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], k), dtype=torch.int8)


@torch.library.custom_op("arbfn::pack", mutates_args=())
def pack(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits [N, k] -> packed uint8 [N, ceil(k/5)]."""
    return pack_reference(trits)


@pack.register_kernel("cuda")
def _(trits: torch.Tensor) -> torch.Tensor:
    return pack_triton(trits)


@pack.register_fake
def _(trits: torch.Tensor) -> torch.Tensor:
    return trits.new_empty((trits.shape[0], packed_width(trits.shape[1])), dtype=torch.uint8)
