"""The packed ternary format (kernels/packing.py): Triton kernels vs references vs an independent oracle.

Exact integer results are compared with equality. The oracle below decodes bytes with its own base-3
digit loop (numpy, float64), sharing no code with kernels/. Pack/unpack kernels launch one program per
row, and the interpreter costs ~10 ms per pack program, so the hypothesis properties keep N small
(1..8: rows are independent); one fixed test covers a wide N=70, K=130 tensor.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import triton
import triton.language as tl
from kernels._triton import floor_div_pow3, floor_div_pow3_wide, trit_float

from kernels.packing import (
    MAX_GROUP_SIZE,
    MIN_GROUP_SIZE,
    check_group_size,
    decode_reference,
    n_groups,
    pack_reference,
    pack_triton,
    packed_width,
    unpack_reference,
    unpack_triton,
    validate_packed,
    validate_trits,
)

GROUP_SIZES = (4, 6, 8, 16, 32, 64, 96)
K_EDGES = (1, 2, 3, 4, 5, 6, 7, 11, 13, 31, 37, 61, 64, 67, 96, 97, 127, 128, 129, 130)
TRIT_FILLS = ("random", "zero", "minus", "plus", "sparse")

ks = st.one_of(st.sampled_from(K_EDGES), st.integers(1, 130))
ns = st.one_of(st.sampled_from((1, 2, 3, 5, 7)), st.integers(1, 8))
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- independent oracle (no kernels code)


def oracle_trits(packed: torch.Tensor, k: int) -> np.ndarray:
    """Trits [N, k] (int64) from bytes by a plain base-3 digit loop: digit i of byte b is the trit of column 5b+i."""
    d = packed.cpu().numpy().astype(np.int64)
    n, kb = d.shape
    out = np.empty((n, kb * 5), np.int64)
    for i in range(5):
        out[:, i::5] = d % 3 - 1
        d = d // 3
    return out[:, :k]


def oracle_bytes(trits: torch.Tensor) -> np.ndarray:
    """Bytes [N, ceil(k/5)] (int64): sum_i (t_i + 1) * 3**i, missing columns count as zero trits (digit 1)."""
    t = trits.cpu().numpy().astype(np.int64)
    n, k = t.shape
    kb = -(-k // 5)
    digits = np.ones((n, kb * 5), np.int64)
    digits[:, :k] = t + 1
    out = np.zeros((n, kb), np.int64)
    for i in reversed(range(5)):
        out = out * 3 + digits[:, i::5]
    return out


def oracle_decode64(packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> np.ndarray:
    """``T * 2**E`` in float64, E indexed by column // group_size."""
    t = oracle_trits(packed, k).astype(np.float64)
    e = exp.cpu().numpy().astype(np.int64)[:, np.arange(k) // group_size]
    return np.ldexp(t, e)


# ---------------------------------------------------------------- data


def make_trits(n: int, k: int, seed: int, fill: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if fill == "zero":
        return torch.zeros((n, k), dtype=torch.int8)
    if fill == "minus":
        return torch.full((n, k), -1, dtype=torch.int8)
    if fill == "plus":
        return torch.ones((n, k), dtype=torch.int8)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    if fill == "sparse":
        t = t * (torch.rand((n, k), generator=g) < 0.1).to(torch.int8)
    return t


def canonical_bytes(n: int, k: int, seed: int) -> torch.Tensor:
    """Any valid packed bytes 0..242 whose padding digits (columns >= k in the last byte) are zero trits."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 243, (n, packed_width(k)), generator=g, dtype=torch.int32)
    r = k % 5
    if r:
        low = 3**r
        b[:, -1] = b[:, -1] % low + low * (121 // low)  # keep real digits, set padding digits to 1
    return b.to(torch.uint8)


def on(device: str, t: torch.Tensor) -> torch.Tensor:
    return t.to(device)


# ---------------------------------------------------------------- sizes


@given(k=st.integers(0, 10_000), gs=st.sampled_from(GROUP_SIZES))
def test_packed_width_and_groups(k, gs):
    assert packed_width(k) * 5 >= k > (packed_width(k) - 1) * 5
    assert n_groups(k, gs) * gs >= k > (n_groups(k, gs) - 1) * gs


# ---------------------------------------------------------------- round trips


@given(n=ns, k=ks, seed=seeds, fill=st.sampled_from(TRIT_FILLS), strided=st.booleans())
def test_trits_round_trip(kernel_device, n, k, seed, fill, strided):
    trits = make_trits(n, k, seed, fill)
    if strided:  # a non-contiguous view: the launchers must not read the wrong row stride
        wide = torch.full((n, k + 3), 1, dtype=torch.int8)
        wide[:, 1 : k + 1] = trits
        trits = wide[:, 1 : k + 1]
        assert not trits.is_contiguous() or n == 1

    ref = pack_reference(trits)
    assert ref.dtype == torch.uint8 and ref.shape == (n, packed_width(k))
    assert np.array_equal(ref.numpy().astype(np.int64), oracle_bytes(trits))
    validate_packed(ref, k)  # packing always produces canonical, valid bytes
    assert torch.equal(unpack_reference(ref, k), trits)

    tri = pack_triton(on(kernel_device, trits)).cpu()
    assert tri.dtype == torch.uint8
    assert torch.equal(tri, ref)
    back = unpack_triton(on(kernel_device, ref), k).cpu()
    assert back.dtype == torch.int8
    assert torch.equal(back, trits)


@given(n=ns, k=ks, seed=seeds)
def test_bytes_round_trip(kernel_device, n, k, seed):
    packed = canonical_bytes(n, k, seed)
    validate_packed(packed, k)

    ref = unpack_reference(packed, k)
    assert ref.dtype == torch.int8 and ref.shape == (n, k)
    assert np.array_equal(ref.numpy().astype(np.int64), oracle_trits(packed, k))
    assert torch.equal(pack_reference(ref), packed)

    tri = unpack_triton(on(kernel_device, packed), k)
    assert torch.equal(tri.cpu(), ref)
    assert torch.equal(pack_triton(tri).cpu(), packed)


def test_wide_rows_round_trip(kernel_device):
    """N=70 (one program per row), K=130 (26 bytes); all 243 byte values appear."""
    n, k = 70, 130
    packed = (torch.arange(n * packed_width(k)) % 243).to(torch.uint8).view(n, packed_width(k))
    trits = unpack_triton(on(kernel_device, packed), k).cpu()
    assert np.array_equal(trits.numpy().astype(np.int64), oracle_trits(packed, k))
    assert torch.equal(pack_triton(on(kernel_device, trits)).cpu(), packed)


@given(n=ns, k=ks.filter(lambda k: k % 5), seed=seeds, data=st.data())
def test_nonzero_padding_is_rejected_and_ignored(kernel_device, n, k, seed, data):
    packed = canonical_bytes(n, k, seed)
    row = data.draw(st.integers(0, n - 1), label="row")
    r = k % 5
    digit = data.draw(st.integers(r, 4), label="padding digit")
    value = data.draw(st.sampled_from((0, 2)), label="digit value")  # 1 is the zero trit
    bad = packed.clone()
    b = int(bad[row, -1])
    bad[row, -1] = b + (value - (b // 3**digit) % 3) * 3**digit
    assert int(bad[row, -1]) <= 242

    with pytest.raises(ValueError, match="pad"):
        validate_packed(bad, k)
    # Decoding never reads padding digits: the trits equal the canonical bytes' trits, and packing
    # them again gives the canonical bytes back (not the corrupted ones).
    assert torch.equal(unpack_reference(bad, k), unpack_reference(packed, k))
    tri = unpack_triton(on(kernel_device, bad), k)
    assert torch.equal(tri.cpu(), unpack_reference(packed, k))
    assert torch.equal(pack_reference(unpack_reference(bad, k)), packed)


# ---------------------------------------------------------------- validation


@given(n=ns, k=ks, seed=seeds, data=st.data())
def test_validate_packed_rejects_invalid_bytes(n, k, seed, data):
    packed = canonical_bytes(n, k, seed)
    kb = packed.shape[1]
    positions = data.draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, kb - 1)), min_size=1, max_size=4, unique=True),
        label="positions",
    )
    values = data.draw(st.lists(st.integers(243, 255), min_size=len(positions), max_size=len(positions)), label="values")
    for (r, c), v in zip(positions, values):
        packed[r, c] = v
    (r0, c0), v0 = min(zip(positions, values))  # the first bad byte in row-major order
    pattern = re.escape(f"{len(positions)} invalid byte(s)") + ".*" + re.escape(f"[{r0}, {c0}] = {v0}")
    for kk in (k, None):
        with pytest.raises(ValueError, match=pattern):
            validate_packed(packed, kk)


@pytest.mark.parametrize(
    "packed",
    [
        torch.full((3, 3), 121, dtype=torch.int8),
        torch.full((3, 3), 121, dtype=torch.int32),
        torch.full((3, 3), 121.0, dtype=torch.float32),
        torch.ones((3, 3), dtype=torch.bool),
        torch.full((9,), 121, dtype=torch.uint8),
        torch.full((1, 3, 3), 121, dtype=torch.uint8),
        torch.tensor(121, dtype=torch.uint8),
    ],
    ids=["int8", "int32", "float32", "bool", "1d", "3d", "0d"],
)
def test_validate_packed_rejects_dtype_and_rank(packed):
    for k in (13, None):
        with pytest.raises(ValueError, match="2-D uint8"):
            validate_packed(packed, k)


@given(n=ns, k=ks, delta=st.sampled_from((-2, -1, 1, 2)))
def test_validate_packed_rejects_wrong_width(n, k, delta):
    width = packed_width(k) + delta
    if width < 0:
        width = packed_width(k) + 1
    packed = torch.full((n, width), 121, dtype=torch.uint8)
    with pytest.raises(ValueError, match=re.escape(f"need {packed_width(k)} bytes, got {width}")):
        validate_packed(packed, k)
    validate_packed(packed)  # without k only the bytes are checked
    validate_packed(torch.full((n, packed_width(k)), 121, dtype=torch.uint8), k)


@given(n=ns, k=ks, seed=seeds, data=st.data())
def test_validate_trits(n, k, seed, data):
    trits = make_trits(n, k, seed, "random")
    validate_trits(trits)
    r = data.draw(st.integers(0, n - 1), label="row")
    c = data.draw(st.integers(0, k - 1), label="col")
    v = data.draw(st.one_of(st.integers(-128, -2), st.integers(2, 127)), label="value")
    trits[r, c] = v
    with pytest.raises(ValueError, match=re.escape("{-1, 0, +1}")):
        validate_trits(trits)


@pytest.mark.parametrize(
    "trits",
    [
        torch.zeros((3, 3), dtype=torch.int32),
        torch.zeros((3, 3), dtype=torch.uint8),
        torch.zeros((3, 3), dtype=torch.float32),
        torch.zeros((9,), dtype=torch.int8),
        torch.zeros((1, 3, 3), dtype=torch.int8),
    ],
    ids=["int32", "uint8", "float32", "1d", "3d"],
)
def test_validate_trits_rejects_dtype_and_rank(trits):
    with pytest.raises(ValueError, match="2-D int8"):
        validate_trits(trits)


@pytest.mark.parametrize("group_size", [3, 97, 0, 1, -4, 128])
def test_check_group_size_rejects(group_size):
    with pytest.raises(ValueError, match=f"got {group_size}"):
        check_group_size(group_size)


def test_check_group_size_accepts_4_to_96():
    assert (MIN_GROUP_SIZE, MAX_GROUP_SIZE) == (4, 96)
    for gs in range(4, 97):
        check_group_size(gs)


# ---------------------------------------------------------------- ops


@given(n=ns, k=ks, seed=seeds, fill=st.sampled_from(TRIT_FILLS))
def test_ops_match_references(kernel_device, n, k, seed, fill):
    trits = make_trits(n, k, seed, fill)
    packed = pack_reference(trits)
    assert torch.equal(torch.ops.arbfn.pack(trits), packed)
    assert torch.equal(torch.ops.arbfn.unpack(packed, k), trits)
    if kernel_device != "cpu":  # on a GPU the ops dispatch to the Triton kernels
        assert torch.equal(torch.ops.arbfn.pack(trits.to(kernel_device)).cpu(), packed)
        assert torch.equal(torch.ops.arbfn.unpack(packed.to(kernel_device), k).cpu(), trits)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 13), (2, 37)])
def test_opcheck(kernel_device, n, k):
    trits = make_trits(n, k, 0, "random").to(kernel_device)
    torch.library.opcheck(torch.ops.arbfn.pack.default, (trits,))
    torch.library.opcheck(torch.ops.arbfn.unpack.default, (pack_reference(trits.cpu()).to(kernel_device), k))


# ---------------------------------------------------------------- decode


@given(
    n=ns,
    k=ks,
    gs=st.sampled_from(GROUP_SIZES),
    seed=seeds,
    fill=st.sampled_from(TRIT_FILLS),
    e_range=st.sampled_from(((-20, 10), (0, 0), (-128, 127))),
    dtype=st.sampled_from((torch.float32, torch.float64)),
)
def test_decode_reference_equals_float64_formula(n, k, gs, seed, fill, e_range, dtype):
    packed = pack_reference(make_trits(n, k, seed, fill))
    g = torch.Generator().manual_seed(seed + 1)
    exp = torch.randint(e_range[0], e_range[1] + 1, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    w = decode_reference(packed, exp, k, gs, dtype=dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    # +-2**E is exact in fp32 for every int8 E (2**-128 is subnormal but representable): exact equality.
    assert np.array_equal(w.double().numpy(), oracle_decode64(packed, exp, k, gs))


# ---------------------------------------------------------------- the kernels' digit arithmetic, exhaustively


@triton.jit
def _digit_helpers_kernel(floor_ptr, trit_ptr, ON_FLOAT: tl.constexpr):
    b = tl.arange(0, 256)
    bf = b.to(tl.float32)
    for d in tl.static_range(5):
        tl.store(floor_ptr + d * 256 + b, floor_div_pow3(b, bf, d, ON_FLOAT), mask=b < 243)
        tl.store(trit_ptr + d * 256 + b, trit_float(b, tl.full((256,), d, tl.int32)), mask=b < 243)


@pytest.mark.parametrize("on_float", [False, True])
def test_digit_helpers_are_exact_for_every_byte(kernel_device, on_float):
    """``floor_div_pow3`` (the GEMV's floors) on either pipe and ``trit_float`` (a norm's gain), for all 243
    bytes and digits 0..4, against integer division: the magic-number roundings have no slack to spare."""
    floors = torch.full((5, 256), -9.0, device=kernel_device)
    trits = torch.full((5, 256), -9.0, device=kernel_device)
    _digit_helpers_kernel[(1,)](floors, trits, ON_FLOAT=on_float)
    b = torch.arange(243)
    assert torch.equal(floors[:, :243].cpu(), torch.stack([b // 3**d for d in range(5)]).float())
    assert torch.equal(trits[:, :243].cpu(), torch.stack([(b // 3**d) % 3 - 1 for d in range(5)]).float())


@triton.jit
def _wide_floor_kernel(out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    vf = v.to(tl.float32)
    for j in tl.static_range(9):
        tl.store(out_ptr + j * V + v, floor_div_pow3_wide(vf, j), mask=v < V)


def test_wide_floor_is_exact_for_every_octet_value(kernel_device):
    """``floor_div_pow3_wide`` (the octet decode's digits) for every ``v < 3**12`` and j in 0..8, against
    integer division: its error bound leaves a factor of five, checked here rather than trusted."""
    v_max, block = 3**12, 2**16
    out = torch.full((9, v_max), -9.0, device=kernel_device)
    _wide_floor_kernel[(-(-v_max // block),)](out, V=v_max, BLOCK=block)
    v = torch.arange(v_max)
    assert torch.equal(out.cpu(), torch.stack([v // 3**j for j in range(9)]).float())
