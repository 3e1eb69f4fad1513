"""The lookup-table GEMV (kernels/gemv_lut.py): against a float64 oracle over shapes, group sizes, K splits,
input dtypes, input scales and misaligned packed and exponent views; its slot bound and chunk shape; its
refusal of wide groups and of more than two input rows; and that the few-row forward uses it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.linear as linear
from kernels import gemv_lut
from kernels.packing import decode_reference, n_groups, pack_reference

# error against float64, relative to |x| @ |W|.T: fp32 entries and sums; fp16 entries (11-bit significands,
# scaled per group) under a bf16 or fp16 output's rounding
REL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-9}


def weight(n: int, k: int, gs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed trits [n, packed_width(k)] and exponents, on the CPU."""
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8))
    return p, torch.randint(-12, 6, (n, n_groups(k, gs)), generator=gen, dtype=torch.int8)


def misaligned(p: torch.Tensor, offset: int, device: str) -> torch.Tensor:
    """``p`` on ``device`` as a view ``offset`` bytes into a larger buffer, so its data pointer is not 8-byte
    aligned unless offset is a multiple of 8 (``.to`` alone would give a fresh, aligned buffer)."""
    buf = torch.full((offset + p.numel(),), 121, dtype=p.dtype, device=device)
    buf[offset:] = p.flatten().to(device)
    return buf[offset:].view(p.shape)


def check(y: torch.Tensor, x: torch.Tensor, p: torch.Tensor, e: torch.Tensor, k: int, gs: int) -> None:
    w = decode_reference(p.cpu(), e.cpu(), k, gs).double()  # exact: powers of two and zeros
    ref, mag = x.double() @ w.T, x.double().abs() @ w.abs().T
    err = float((y.cpu().double() - ref).norm() / max(float(mag.norm()), 1e-300))
    assert err <= REL[y.dtype], err


@settings(max_examples=80)  # each example runs several interpreted launches: 200 took 100-250 s on 2 cores
@given(m=st.integers(1, 2), n=st.integers(1, 70), k=st.integers(1, 400), gs=st.integers(1, 36),
       splits=st.integers(1, 4), offset=st.integers(0, 9), dtype=st.sampled_from(list(REL)),
       spread=st.sampled_from([0, 20]), seed=st.integers(0, 2**16))
def test_matches_float64_oracle(kernel_device, m, n, k, gs, splits, offset, dtype, spread, seed):
    """``spread`` scales each input column by up to 2**±spread, so groups' scales differ widely (not for fp16,
    whose range, up to 65504, has no room for it)."""
    gen = torch.Generator().manual_seed(seed)
    spread = 0 if dtype == torch.float16 else spread
    p, e = weight(n, k, gs, gen)
    x = (torch.randn((m, k), generator=gen) * 2.0 ** torch.randint(-spread, spread + 1, (k,), generator=gen)).to(dtype)
    y = gemv_lut.gemv_lut(x.to(kernel_device), misaligned(p, offset, kernel_device),
                          misaligned(e, offset // 2, kernel_device), k, gs, splits)
    assert y.shape == (m, n) and y.dtype == x.dtype
    check(y, x, p, e, k, gs)


@pytest.mark.parametrize("gs", range(1, 80))
def test_slots_bound_every_group(gs):
    """No group touches more bytes than ``slots`` (exact but for multiples of 5, one over), and the table
    GEMV takes exactly the group sizes whose bound fits its three words."""
    k = 5 * gs * 10
    touched = max((min(c + gs, k) - 1) // 5 - c // 5 + 1 for c in range(0, k, gs))
    assert touched <= gemv_lut.slots(gs) <= touched + (gs % 5 == 0)
    assert gemv_lut.fits(gs) == (gs <= 36)


@pytest.mark.parametrize("gs", range(1, 37))
def test_chunks_are_whole_groups_and_whole_bytes(gs):
    groups, nbytes = gemv_lut.chunk_shape(gs)
    assert groups * gs == 5 * nbytes and groups in (1, 5) and (groups == 1) == (gs % 5 == 0)


def test_rejects_groups_that_do_not_fit(kernel_device):
    p, e = weight(3, 100, 40, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="up to 36"):
        gemv_lut.gemv_lut(torch.randn(1, 100, device=kernel_device), p.to(kernel_device), e.to(kernel_device),
                          100, 40, 1)


@pytest.mark.parametrize("m", [0, 3])
def test_rejects_row_counts_outside_one_to_two(kernel_device, m):
    p, e = weight(3, 100, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="1 to 2 input rows"):
        gemv_lut.gemv_lut(torch.randn(m, 100, device=kernel_device), p.to(kernel_device), e.to(kernel_device),
                          100, 32, 1)


@pytest.mark.parametrize("gs,uses_table", [(32, True), (6, True), (36, True), (37, False), (64, False)])
def test_few_row_forward_takes_the_table_gemv_where_it_fits(kernel_device, monkeypatch, gs, uses_table):
    calls = []
    real = gemv_lut.gemv_lut
    monkeypatch.setattr(gemv_lut, "gemv_lut", lambda *a: calls.append(a[4]) or real(*a))
    gen = torch.Generator().manual_seed(gs)
    k, n = 3 * gs + 7, 9
    p, e = weight(n, k, gs, gen)
    x = torch.randn((linear.GEMV_MAX_M, k), generator=gen)
    y = linear.linear_fwd_triton(x.to(kernel_device), p.to(kernel_device), e.to(kernel_device), k, gs)
    assert calls == ([gs] if uses_table else [])
    check(y, x, p, e, k, gs)


def test_serves_every_row_count_the_few_row_forward_sends():
    assert gemv_lut.MAX_ROWS >= linear.GEMV_MAX_M
