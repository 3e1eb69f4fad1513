"""Ternary RMSNorm (kernels/rmsnorm.py): Triton kernels vs references vs a float64 oracle, both gradients,
vmap (batched activations and per-sample gradients), torch.compile and opcheck.

The oracle decodes the gain with its own base-3 digit loop and differentiates the textbook formula with
float64 autograd (no kernels code).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.packing import n_groups, pack_reference
from kernels.rmsnorm import (
    rmsnorm_bwd_reference,
    rmsnorm_bwd_triton,
    rmsnorm_fwd_reference,
    rmsnorm_fwd_triton,
    ternary_rmsnorm,
)

GROUP_SIZES = (4, 6, 8, 16, 32, 96)
D_EDGES = (1, 2, 3, 5, 7, 13, 31, 64, 97, 128, 130, 257)
LEADS = ((1,), (2,), (3,), (17,), (40,), (2, 3), (3, 7))
EPS = (1e-6, 1e-5, 0.1)
REL_REF = 1e-5  # fp32 reference vs float64 oracle
REL_TRITON = 1e-5  # Triton vs reference (both fp32, different reduction order)


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, mag: torch.Tensor | None = None) -> None:
    """``‖a - b‖ / ‖mag‖ <= tol`` in float64 (``mag`` bounds the summed magnitudes; default ``|b|``)."""
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    mag = b.abs() if mag is None else mag.detach().cpu().double()
    num, den = float((a - b).norm()), float(mag.norm())
    err = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ---------------------------------------------------------------- independent float64 oracle


def oracle_gain64(packed: torch.Tensor, exp: torch.Tensor, d: int, gs: int) -> torch.Tensor:
    """``T * 2**E`` [d] in float64 from a plain base-3 digit loop over the bytes."""
    b = packed[0].numpy().astype(np.int64)
    t = np.empty(b.size * 5, np.float64)
    for i in range(5):
        t[i::5] = b % 3 - 1
        b = b // 3
    return torch.from_numpy(np.ldexp(t[:d], exp[0].numpy().astype(np.int64)[np.arange(d) // gs]))


def oracle(case) -> dict[str, torch.Tensor]:
    """Float64 forward, dL/dx and dL/dgain of ``sum(y * gy)``, plus magnitude bounds for the tolerances."""
    x = case["x"].double().requires_grad_()
    gain = case["gain64"].clone().requires_grad_()
    gy = case["gy"].double()
    r = 1.0 / torch.sqrt((x * x).mean(-1, keepdim=True) + case["eps"])
    y = x * r * gain
    gx, gg = torch.autograd.grad((y * gy).sum(), [x, gain])
    xa, ga, rr = x.detach().abs(), gy.abs(), r.detach()
    ggain = (ga * gain.detach().abs())
    gx_mag = rr * (ggain + xa * rr * (ggain * xa * rr).mean(-1, keepdim=True))
    return dict(y=y.detach(), gx=gx, gg=gg.reshape(1, -1), gx_mag=gx_mag,
                gg_mag=(ga * xa * rr).reshape(-1, x.shape[-1]).sum(0, keepdim=True))


# ---------------------------------------------------------------- data


@st.composite
def cases(draw, max_d: int = 260):
    lead = draw(st.sampled_from(LEADS), label="lead")
    d = draw(st.one_of(st.sampled_from([e for e in D_EDGES if e <= max_d]), st.integers(1, max_d)), label="D")
    gs = draw(st.sampled_from(GROUP_SIZES), label="group_size")
    eps = draw(st.sampled_from(EPS), label="eps")
    scale = draw(st.sampled_from((1.0, 1e-3, 1e3)), label="scale")
    e_lo = draw(st.integers(-6, 2), label="E lo")
    fill = draw(st.sampled_from(("random", "plus", "zero")), label="trits")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    if fill == "random":
        trits = torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8)
    else:
        trits = torch.full((1, d), 1 if fill == "plus" else 0, dtype=torch.int8)
    exp = torch.randint(e_lo, e_lo + 4, (1, n_groups(d, gs)), generator=g, dtype=torch.int8)
    packed = pack_reference(trits)
    x = torch.randn((*lead, d), generator=g) * scale
    gy = torch.randn((*lead, d), generator=g)
    return dict(x=x, gy=gy, packed=packed, exp=exp, d=d, gs=gs, eps=eps, gain64=oracle_gain64(packed, exp, d, gs))


def on(case, dev):
    return case["packed"].to(dev), case["exp"].to(dev)


# ---------------------------------------------------------------- forward and backward ops


@given(case=cases())
def test_forward_triton_reference_oracle(kernel_device, case):
    x, p, e, eps, gs = case["x"], case["packed"], case["exp"], case["eps"], case["gs"]
    ref = rmsnorm_fwd_reference(x, p, e, eps, gs)
    o = oracle(case)
    assert ref.dtype == torch.float32 and ref.shape == x.shape
    assert_rel(ref, o["y"], REL_REF, "reference forward vs float64")
    pd, ed = on(case, kernel_device)
    y = rmsnorm_fwd_triton(x.to(kernel_device), pd, ed, eps, gs)
    assert y.dtype == torch.float32 and y.device.type == kernel_device
    assert_rel(y, ref, REL_TRITON, "Triton forward vs reference", mag=o["y"].abs())


@given(case=cases())
def test_backward_triton_reference_oracle(kernel_device, case):
    x, gy, p, e, eps, gs = case["x"], case["gy"], case["packed"], case["exp"], case["eps"], case["gs"]
    o = oracle(case)
    gx, gg = rmsnorm_bwd_reference(gy, x, p, e, eps, gs)
    assert gx.shape == x.shape and gg.shape == (1, case["d"]) and gg.dtype == torch.float32
    assert_rel(gx, o["gx"], REL_REF, "reference dL/dx vs float64", mag=o["gx_mag"])
    assert_rel(gg, o["gg"], REL_REF, "reference dL/dgain vs float64", mag=o["gg_mag"])
    pd, ed = on(case, kernel_device)
    tx, tg = rmsnorm_bwd_triton(gy.to(kernel_device), x.to(kernel_device), pd, ed, eps, gs)
    assert tx.device.type == kernel_device and tg.dtype == torch.float32
    assert_rel(tx, gx, REL_TRITON, "Triton dL/dx vs reference", mag=o["gx_mag"])
    assert_rel(tg, gg, REL_TRITON, "Triton dL/dgain vs reference", mag=o["gg_mag"])


@pytest.mark.parametrize("d", [1000, 4099, 8192])
def test_wide_rows(kernel_device, d):
    """Large D (up to the 8192 limit): Triton vs reference, forward and backward."""
    g = torch.Generator().manual_seed(d)
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8))
    e = torch.randint(-2, 2, (1, n_groups(d, 64)), generator=g, dtype=torch.int8)
    x, gy = torch.randn((3, d), generator=g), torch.randn((3, d), generator=g)
    pd, ed, xd, gd = p.to(kernel_device), e.to(kernel_device), x.to(kernel_device), gy.to(kernel_device)
    assert_rel(rmsnorm_fwd_triton(xd, pd, ed, 1e-6, 64), rmsnorm_fwd_reference(x, p, e, 1e-6, 64), REL_TRITON, "fwd")
    for a, b in zip(rmsnorm_bwd_triton(gd, xd, pd, ed, 1e-6, 64), rmsnorm_bwd_reference(gy, x, p, e, 1e-6, 64)):
        assert_rel(a, b, REL_TRITON, "bwd")


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_backward_programs_loop_over_row_blocks(kernel_device, monkeypatch, programs):
    """Capped at ``BWD_PROGRAMS`` programs, each walks several row blocks (the last past the rows) and sums its
    own dL/dgain partial: the same gradients as one block per program."""
    import kernels.rmsnorm as rmsnorm

    g = torch.Generator().manual_seed(programs)
    d, rows = 20, 5 * 16 + 3  # 16 rows a block at D 20: six blocks, the last one partial
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8))
    e = torch.randint(-2, 2, (1, n_groups(d, 4)), generator=g, dtype=torch.int8)
    x, gy = torch.randn((rows, d), generator=g), torch.randn((rows, d), generator=g)
    args = gy.to(kernel_device), x.to(kernel_device), p.to(kernel_device), e.to(kernel_device), 1e-6, 4
    one_block_each = rmsnorm_bwd_triton(*args)
    monkeypatch.setattr(rmsnorm, "BWD_PROGRAMS", programs)
    looped = rmsnorm_bwd_triton(*args)
    assert torch.equal(looped[0], one_block_each[0])
    for a, b in zip(looped, rmsnorm_bwd_reference(gy, x, p, e, 1e-6, 4)):
        assert_rel(a, b, REL_TRITON, "bwd")


def test_triton_refuses_too_wide_rows(kernel_device):
    d = 8193
    p = pack_reference(torch.ones((1, d), dtype=torch.int8)).to(kernel_device)
    e = torch.zeros((1, n_groups(d, 64)), dtype=torch.int8, device=kernel_device)
    with pytest.raises(ValueError, match="8192"):
        rmsnorm_fwd_triton(torch.ones((1, d), device=kernel_device), p, e, 1e-6, 64)


# ---------------------------------------------------------------- ternary_rmsnorm: gradients through the probe


@given(case=cases(), expanded=st.booleans())
def test_ternary_rmsnorm_gradients(kernel_device, case, expanded):
    """torch.func.grad wrt probe and x equal the float64 gradients (on kernel_device: the Triton path on CUDA)."""
    dev, d = kernel_device, case["d"]
    pd, ed = on(case, dev)
    x, gy = case["x"].to(dev), case["gy"].to(dev)
    probe = torch.zeros((), device=dev).expand(1, d) if expanded else torch.zeros((1, d), device=dev)

    def loss(probe, x):
        return (ternary_rmsnorm(x, pd, ed, probe, case["eps"], case["gs"]) * gy).sum()

    g_probe, g_x = torch.func.grad(loss, argnums=(0, 1))(probe, x)
    o = oracle(case)
    assert g_probe.shape == (1, d) and g_x.shape == x.shape
    assert_rel(g_probe, o["gg"], REL_REF, "probe gradient vs float64", mag=o["gg_mag"])
    assert_rel(g_x, o["gx"], REL_REF, "input gradient vs float64", mag=o["gx_mag"])


def _small_case(seed: int = 0, lead=(4, 5), d: int = 37, gs: int = 6):
    g = torch.Generator().manual_seed(seed)
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8))
    e = torch.randint(-2, 2, (1, n_groups(d, gs)), generator=g, dtype=torch.int8)
    return p, e, torch.randn((*lead, d), generator=g), torch.randn((*lead, d), generator=g), d, gs


def test_probe_values_ignored_and_probe_none():
    p, e, x, gy, d, gs = _small_case()
    y = ternary_rmsnorm(x, p, e, None, 1e-6, gs)
    assert torch.equal(y, ternary_rmsnorm(x, p, e, torch.full((1, d), 5.0), 1e-6, gs))
    xr = x.clone().requires_grad_()
    probe = torch.zeros((1, d))
    (ternary_rmsnorm(xr, p, e, probe, 1e-6, gs) * gy).sum().backward()
    assert probe.grad is None and xr.grad is not None


def test_vmap_forward_and_per_sample_gradients():
    """vmap over a batch dim (front or not) equals leading dims; vmap(grad) gives each sample's probe gradient."""
    p, e, x, gy, d, gs = _small_case()
    eager = ternary_rmsnorm(x, p, e, None, 1e-6, gs)
    assert torch.equal(torch.func.vmap(lambda xi: ternary_rmsnorm(xi, p, e, None, 1e-6, gs))(x), eager)
    moved = torch.func.vmap(lambda xi: ternary_rmsnorm(xi, p, e, None, 1e-6, gs), in_dims=1, out_dims=1)
    assert torch.equal(moved(x.transpose(0, 1)), eager.transpose(0, 1))

    def loss(probe, xi, gi):
        return (ternary_rmsnorm(xi, p, e, probe, 1e-6, gs) * gi).sum()

    probe = torch.zeros((1, d))
    per_p, per_x = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(probe, x, gy)
    assert per_p.shape == (x.shape[0], 1, d) and per_x.shape == x.shape
    for i in range(x.shape[0]):
        gp_i, gx_i = torch.func.grad(loss, argnums=(0, 1))(probe, x[i], gy[i])
        assert torch.allclose(per_p[i], gp_i, rtol=1e-6, atol=1e-6) and torch.allclose(per_x[i], gx_i, rtol=1e-6, atol=1e-7)
    full_p = torch.func.grad(loss)(probe, x, gy)
    assert torch.allclose(per_p.sum(0), full_p, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) of the loss; gradients by autograd.grad outside equal eager."""
    torch._dynamo.reset()
    p, e, x, gy, d, gs = _small_case(1, lead=(3, 7), d=29, gs=4)
    f = lambda probe, x: (ternary_rmsnorm(x, p, e, probe, 1e-5, gs) * gy).sum()  # noqa: E731
    probe = torch.zeros((1, d), requires_grad=True)
    xr = x.clone().requires_grad_()
    loss_e = f(probe, xr)
    ge = torch.autograd.grad(loss_e, [probe, xr])
    loss_c = torch.compile(f, fullgraph=True)(probe, xr)
    gc = torch.autograd.grad(loss_c, [probe, xr])
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(gc, ge):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_bad_shapes_raise():
    p, e, x, _, d, gs = _small_case()
    with pytest.raises(ValueError, match="packed"):
        ternary_rmsnorm(x[..., :-3], p, e, None, 1e-6, gs)
    with pytest.raises(ValueError, match="exp"):
        ternary_rmsnorm(x, p, e[:, :-1], None, 1e-6, gs)
    with pytest.raises(ValueError, match="probe"):
        ternary_rmsnorm(x, p, e, torch.zeros(2, d), 1e-6, gs)
    with pytest.raises(TypeError, match="floating"):
        ternary_rmsnorm(x.long(), p, e, None, 1e-6, gs)


@pytest.mark.parametrize("lead,d,gs", [((1,), 1, 4), ((2, 3), 13, 4), ((5,), 37, 6)])
def test_opcheck(kernel_device, lead, d, gs):
    p, e, x, gy, d, gs = _small_case(d, lead=lead, d=d, gs=gs)
    pd, ed, xd, gd = p.to(kernel_device), e.to(kernel_device), x.to(kernel_device), gy.to(kernel_device)
    torch.library.opcheck(torch.ops.arbfn.rmsnorm_fwd.default, (xd, pd, ed, 1e-6, gs))
    torch.library.opcheck(torch.ops.arbfn.rmsnorm_bwd.default, (gd, xd, pd, ed, 1e-6, gs))
