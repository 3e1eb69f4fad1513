"""Ternary linear (kernels/linear.py): Triton kernels vs references vs float64 formulas, and the gradients.

The float64 oracle decodes ``W = T * 2**E`` with its own base-3 digit loop (no kernels code). Interpreted
tests use float32 only (the interpreter's bf16 arithmetic is wrong); on CUDA ``tl.dot`` runs in tf32,
hence the looser Triton tolerance there, and a bf16 check runs only there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st


import kernels.linear as linear
from kernels.linear import (
    GEMV_MAX_M,
    decode_triton,
    linear_bwd_x_reference,
    linear_bwd_x_triton,
    linear_fwd_reference,
    linear_fwd_triton,
    ternary_linear,
)
from kernels.packing import n_groups, pack_reference

GROUP_SIZES = (4, 6, 8, 16, 32, 64, 96)
M_EDGES = (1, 2, 3, 5, 7, 13, 16, 17, 31, 37, 40)
N_EDGES = (1, 2, 3, 5, 7, 13, 31, 61, 63, 64, 65, 67, 70)
K_EDGES = (1, 2, 3, 4, 5, 6, 7, 11, 13, 31, 37, 61, 64, 65, 67, 96, 97, 127, 128, 129, 130)
E_RANGES = ((-20, 10), (-20, -10), (0, 10), (0, 0), (-3, 3))
SCALES = ("unit", "large", "small", "mixed")
TRIT_FILLS = ("random", "zero", "minus", "plus", "sparse")

REL_REF_VS_F64 = 1e-6  # fp32 reference vs the float64 formula
REL_TRITON = 2e-3 if torch.cuda.is_available() else 1e-5  # Triton vs reference: tf32 tl.dot on CUDA


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, mag: torch.Tensor | None = None) -> None:
    """``‖a - b‖ / ‖mag‖ <= tol`` in float64, where ``mag`` is the exact product with absolute values
    (``|x| @ |W|.T`` for ``b = x @ W.T``; default ``|b|``).

    fp32 accumulation errs in proportion to the magnitude of the summed terms, not of the sum: an
    all -1 row against random activations cancels to a small ``b``, and a correct fp32 sum then
    differs from the float64 one by far more than 1e-6 of ``‖b‖``. Normalising by ``‖mag‖ >= ‖b‖``
    measures the kernel, not the conditioning of the data; any real defect (a wrong digit, group or
    exponent, a dropped column) moves the result by a sizeable fraction of ``‖mag‖``.
    """
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    mag = b.abs() if mag is None else mag.detach().cpu().double()
    assert bool(torch.isfinite(mag).all()), f"{what}: the expected values are not finite (bad test data)"
    num, den = float((a - b).norm()), float(mag.norm())
    err = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol} (‖b‖/‖mag‖ = {float(b.norm()) / max(den, 1e-300):.3g})"


# ---------------------------------------------------------------- independent float64 oracle


def oracle_w64(packed: torch.Tensor, exp: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``T * 2**E`` [N, k] in float64 from a plain base-3 digit loop over the bytes."""
    d = packed.cpu().numpy().astype(np.int64)
    n, kb = d.shape
    t = np.empty((n, kb * 5), np.float64)
    for i in range(5):
        t[:, i::5] = d % 3 - 1
        d = d // 3
    e = exp.cpu().numpy().astype(np.int64)[:, np.arange(k) // group_size]
    return torch.from_numpy(np.ldexp(t[:, :k], e))


# ---------------------------------------------------------------- data


def dims(edges, lo, hi):
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


leads = st.one_of(
    dims(M_EDGES, 1, 40).map(lambda m: (m,)),
    st.tuples(st.integers(1, 5), st.integers(1, 8)),  # [B, T, K] activations, B*T <= 40
)


def activations(shape, scale: str, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(shape, generator=g)
    if scale == "large":
        return a * 1e4
    if scale == "small":
        return a * 1e-3
    if scale == "mixed":  # per-element magnitudes from 1e-3 to 1e4
        return a * 10.0 ** (torch.rand(shape, generator=g) * 7 - 3)
    return a


@st.composite
def linear_cases(draw):
    lead = draw(leads, label="lead")
    n = draw(dims(N_EDGES, 1, 70), label="n")
    k = draw(dims(K_EDGES, 1, 130), label="k")
    gs = draw(st.sampled_from(GROUP_SIZES), label="group_size")
    e_lo, e_hi = draw(st.sampled_from(E_RANGES), label="E range")
    scale = draw(st.sampled_from(SCALES), label="scale")
    fill = draw(st.sampled_from(TRIT_FILLS), label="trits")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")

    g = torch.Generator().manual_seed(seed)
    if fill == "zero":
        trits = torch.zeros((n, k), dtype=torch.int8)
    elif fill in ("minus", "plus"):
        trits = torch.full((n, k), -1 if fill == "minus" else 1, dtype=torch.int8)
    else:
        trits = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        if fill == "sparse":
            trits = trits * (torch.rand((n, k), generator=g) < 0.1).to(torch.int8)
    exp = torch.randint(e_lo, e_hi + 1, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    x = activations((*lead, k), scale, g)
    gy = activations((*lead, n), scale, g)
    packed = pack_reference(trits)
    return dict(x=x, gy=gy, packed=packed, exp=exp, k=k, gs=gs, w64=oracle_w64(packed, exp, k, gs))


def fwd64(case) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W.T, |x| @ |W|.T) in float64."""
    x, w = case["x"].double(), case["w64"]
    return x @ w.T, x.abs() @ w.abs().T


def bwd64(case) -> tuple[torch.Tensor, torch.Tensor]:
    """(g @ W, |g| @ |W|) in float64."""
    g, w = case["gy"].double(), case["w64"]
    return g @ w, g.abs() @ w.abs()


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (a slice of a wider last dim)."""
    wide = torch.full((*t.shape[:-1], t.shape[-1] + 2), float("nan"), dtype=t.dtype)
    wide[..., 1:-1] = t
    return wide[..., 1:-1]


# ---------------------------------------------------------------- forward


@given(case=linear_cases(), noncontig=st.booleans())
def test_forward_triton_matches_reference(kernel_device, case, noncontig):
    x, p, e, k, gs = case["x"], case["packed"], case["exp"], case["k"], case["gs"]
    ref = linear_fwd_reference(x, p, e, k, gs)
    xd = strided(x) if noncontig else x
    y = linear_fwd_triton(xd.to(kernel_device), p.to(kernel_device), e.to(kernel_device), k, gs)
    assert y.dtype == torch.float32 and y.device.type == kernel_device
    assert_rel(y, ref, REL_TRITON, "Triton forward vs reference", mag=fwd64(case)[1])


@pytest.mark.parametrize("m,n,k,gs,rows_x_splits,splits", [
    (1, 5, 1283, 32, 10, 2), (GEMV_MAX_M, 3, 1031, 6, 1, 1), (1, 17, 3847, 96, 17 * 4, 4),
    (GEMV_MAX_M, 9, 640, 64, 9 * 3, 3), (1, 2, 4099, 4, 10**6, 17)])
def test_gemv_splits_match_reference(kernel_device, monkeypatch, m, n, k, gs, rows_x_splits, splits):
    """The GEMV over 1 split (it writes the output in x's dtype directly), 2-4 splits (fp32 partials summed)
    and the narrowest splits allowed, with ragged last groups and a last byte holding fewer than five columns."""
    monkeypatch.setattr(linear, "GEMV_ROWS_X_SPLITS", rows_x_splits)
    assert linear.gemv_splits(n, n_groups(k, gs), gs) == splits
    g = torch.Generator().manual_seed(k)
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    e = torch.randint(-6, 3, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    x = torch.randn((m, k), generator=g)
    y = linear_fwd_triton(x.to(kernel_device), p.to(kernel_device), e.to(kernel_device), k, gs)
    w = oracle_w64(p, e, k, gs)
    assert_rel(y, x.double() @ w.T, REL_TRITON, f"GEMV, {splits} splits",
               mag=x.double().abs() @ w.abs().T)


@pytest.mark.parametrize("n,k,gs", [(7, 133, 32), (33, 301, 4), (3, 1030, 96)])
def test_decode_exact_over_the_whole_exponent_range(kernel_device, n, k, gs):
    """The Triton decode builds 2**E from bits: exact for every int8 exponent, the subnormal 2**-127 and
    2**-128 and the largest 2**127 included (fp32 output, compared bit for bit with the float64 oracle)."""
    g = torch.Generator().manual_seed(n * k)
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    e = torch.randint(-128, 128, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    e[0, 0], e[-1, -1] = -128, 127
    w = decode_triton(p.to(kernel_device), e.to(kernel_device), k, gs, torch.float32).cpu()
    assert torch.equal(w.double(), oracle_w64(p, e, k, gs))


@given(case=linear_cases())
def test_forward_reference_matches_float64(case):
    x, p, e, k, gs = case["x"], case["packed"], case["exp"], case["k"], case["gs"]
    y = linear_fwd_reference(x, p, e, k, gs)
    assert y.dtype == torch.float32
    assert_rel(y, fwd64(case)[0], REL_REF_VS_F64, "reference forward vs float64", mag=fwd64(case)[1])


# ---------------------------------------------------------------- input gradient


@given(case=linear_cases(), noncontig=st.booleans())
def test_bwd_x_triton_matches_reference(kernel_device, case, noncontig):
    g, p, e, k, gs = case["gy"], case["packed"], case["exp"], case["k"], case["gs"]
    ref = linear_bwd_x_reference(g, p, e, k, gs)
    gd = strided(g) if noncontig else g
    dx = linear_bwd_x_triton(gd.to(kernel_device), p.to(kernel_device), e.to(kernel_device), k, gs)
    assert dx.dtype == torch.float32 and dx.device.type == kernel_device
    assert_rel(dx, ref, REL_TRITON, "Triton bwd_x vs reference", mag=bwd64(case)[1])


@given(case=linear_cases())
def test_bwd_x_reference_matches_float64(case):
    g, p, e, k, gs = case["gy"], case["packed"], case["exp"], case["k"], case["gs"]
    dx = linear_bwd_x_reference(g, p, e, k, gs)
    assert dx.dtype == torch.float32
    assert_rel(dx, bwd64(case)[0], REL_REF_VS_F64, "reference bwd_x vs float64", mag=bwd64(case)[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on the real kernels only")
@given(case=linear_cases())
def test_bf16_on_cuda(case):
    x, g, p, e, k, gs = case["x"], case["gy"], case["packed"], case["exp"], case["k"], case["gs"]
    w64 = case["w64"]
    xb, gb = x.bfloat16(), g.bfloat16()
    pd, ed = p.cuda(), e.cuda()
    y = linear_fwd_triton(xb.cuda(), pd, ed, k, gs)
    assert y.dtype == torch.bfloat16
    assert_rel(y, xb.double() @ w64.T, 2e-2, "bf16 Triton forward vs float64", mag=xb.double().abs() @ w64.abs().T)
    dx = linear_bwd_x_triton(gb.cuda(), pd, ed, k, gs)
    assert dx.dtype == torch.bfloat16
    assert_rel(dx, gb.double() @ w64, 2e-2, "bf16 Triton bwd_x vs float64", mag=gb.double().abs() @ w64.abs())


# ---------------------------------------------------------------- ternary_linear: gradients through the probe


@given(case=linear_cases(), expanded=st.booleans())
def test_ternary_linear_gradients(kernel_device, case, expanded):
    """torch.func.grad gives dL/dprobe = g.T @ x (summed over all leading dims) and dL/dx = g @ W."""
    dev = kernel_device
    x, gy, k, gs = case["x"].to(dev), case["gy"].to(dev), case["k"], case["gs"]
    p, e = case["packed"].to(dev), case["exp"].to(dev)
    n = p.shape[0]
    probe = torch.zeros((), device=dev).expand(n, k) if expanded else torch.zeros((n, k), device=dev)

    def loss(probe, x):
        return (ternary_linear(x, p, e, probe, k, gs) * gy).sum()

    g_probe, g_x = torch.func.grad(loss, argnums=(0, 1))(probe, x)
    assert g_probe.shape == (n, k) and g_probe.dtype == torch.float32
    g64, x64 = case["gy"].double().reshape(-1, n), case["x"].double().reshape(-1, k)
    assert_rel(g_probe, g64.T @ x64, 1e-5, "probe gradient vs g.T @ x", mag=g64.abs().T @ x64.abs())
    assert g_x.shape == x.shape
    tol = REL_TRITON if dev != "cpu" else REL_REF_VS_F64
    assert_rel(g_x, bwd64(case)[0], tol, "input gradient vs g @ W", mag=bwd64(case)[1])


@given(case=linear_cases())
def test_probe_none_and_probe_values(kernel_device, case):
    """probe=None: the same output and input gradient, and no probe gradient; the probe's values are ignored."""
    dev = kernel_device
    x, gy, k, gs = case["x"].to(dev), case["gy"].to(dev), case["k"], case["gs"]
    p, e = case["packed"].to(dev), case["exp"].to(dev)
    n = p.shape[0]
    y_none = ternary_linear(x, p, e, None, k, gs)
    y_zero = ternary_linear(x, p, e, torch.zeros((n, k), device=dev), k, gs)
    y_junk = ternary_linear(x, p, e, torch.full((n, k), 3.0e7, device=dev), k, gs)
    assert torch.equal(y_none, y_zero) and torch.equal(y_none, y_junk)
    assert_rel(y_none, fwd64(case)[0], REL_TRITON if dev != "cpu" else REL_REF_VS_F64, "output", mag=fwd64(case)[1])

    def loss(probe, x):
        return (ternary_linear(x, p, e, probe, k, gs) * gy).sum()

    gx_none = torch.func.grad(lambda x: loss(None, x))(x)
    g_zero, gx_zero = torch.func.grad(loss, argnums=(0, 1))(torch.zeros((n, k), device=dev), x)
    assert g_zero.shape == (n, k)
    assert torch.equal(gx_none, gx_zero)

    # eager autograd: a probe that does not require grad gets none, x still does
    xr = x.clone().requires_grad_()
    probe = torch.zeros((n, k), device=dev)
    (ternary_linear(xr, p, e, probe, k, gs) * gy).sum().backward()
    assert probe.grad is None
    assert torch.equal(xr.grad, gx_none)


@given(case=linear_cases())
def test_leading_batch_dims(case):
    """x [B, T, K] -> [B, T, N]: the same as flattening the leading dims."""
    x, p, e, k, gs = case["x"], case["packed"], case["exp"], case["k"], case["gs"]
    b = 3
    x3 = torch.stack([x.reshape(-1, k)] * b) * torch.tensor([1.0, -2.0, 0.5]).view(b, 1, 1)
    y3 = ternary_linear(x3, p, e, None, k, gs)
    assert y3.shape == (*x3.shape[:-1], p.shape[0])
    y2 = ternary_linear(x3.reshape(-1, k), p, e, None, k, gs)
    mag = x3.double().abs() @ case["w64"].abs().T
    assert_rel(y3, y2.reshape(y3.shape), REL_REF_VS_F64, "[B, T, K] forward vs flattened", mag=mag)


# ---------------------------------------------------------------- op registration


@pytest.mark.parametrize("m,n,k,gs", [(1, 1, 1, 4), (3, 7, 13, 4), (5, 11, 37, 6)])
def test_opcheck(kernel_device, m, n, k, gs):
    g = torch.Generator().manual_seed(m * 100 + k)
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)).to(kernel_device)
    e = torch.randint(-4, 3, (n, n_groups(k, gs)), generator=g, dtype=torch.int8).to(kernel_device)
    x = torch.randn((2, m, k), generator=g).to(kernel_device)
    gy = torch.randn((2, m, n), generator=g).to(kernel_device)
    torch.library.opcheck(torch.ops.arbfn.linear_fwd.default, (x, p, e, k, gs))
    torch.library.opcheck(torch.ops.arbfn.linear_bwd_x.default, (gy, p, e, k, gs))
