"""The lookup-table GEMV (kernels/gemv_lut.py): against a float64 oracle over shapes, group sizes, K splits and
misaligned packed views; its slot bound; its refusal of wide groups; and that the few-row forward uses it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels.linear as linear
from kernels import gemv_lut
from kernels.packing import decode_reference, n_groups, pack_reference

REL = 1e-6  # fp32 table entries and sums against float64, relative to |x| @ |W|.T


def weight(n: int, k: int, gs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed trits [n, packed_width(k)] and exponents, on the CPU."""
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8))
    return p, torch.randint(-12, 6, (n, n_groups(k, gs)), generator=gen, dtype=torch.int8)


def misaligned(p: torch.Tensor, offset: int, device: str) -> torch.Tensor:
    """``p`` on ``device`` as a view ``offset`` bytes into a larger buffer, so its data pointer is not 4-byte
    aligned unless offset is a multiple of 4 (``.to`` alone would give a fresh, aligned buffer)."""
    buf = torch.full((offset + p.numel(),), 121, dtype=torch.uint8, device=device)
    buf[offset:] = p.flatten().to(device)
    return buf[offset:].view(p.shape)


def check(y: torch.Tensor, x: torch.Tensor, p: torch.Tensor, e: torch.Tensor, k: int, gs: int) -> None:
    w = decode_reference(p.cpu(), e.cpu(), k, gs).double()  # exact: powers of two and zeros
    ref, mag = x.double() @ w.T, x.double().abs() @ w.abs().T
    err = float((y.cpu().double() - ref).norm() / max(float(mag.norm()), 1e-300))
    assert err <= REL, err


@given(m=st.integers(1, 2), n=st.integers(1, 70), k=st.integers(1, 700), gs=st.integers(1, 36),
       splits=st.integers(1, 4), offset=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_matches_float64_oracle(kernel_device, m, n, k, gs, splits, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    p, e = weight(n, k, gs, gen)
    x = torch.randn((m, k), generator=gen)
    y = gemv_lut.gemv_lut(x.to(kernel_device), misaligned(p, offset, kernel_device), e.to(kernel_device), k, gs,
                          splits)
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


def test_rejects_groups_that_do_not_fit(kernel_device):
    p, e = weight(3, 100, 40, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="up to 36"):
        gemv_lut.gemv_lut(torch.randn(1, 100, device=kernel_device), p.to(kernel_device), e.to(kernel_device),
                          100, 40, 1)


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
