"""The residual add fused into RMSNorm (kernels/add_rmsnorm.py): Triton vs reference vs a float64 oracle, the
gain partials, bf16 rounding, and every path the model takes it through (autograd, torch.func, vmap, compile,
opcheck), each against the unfused ``x + r`` followed by ``ternary_rmsnorm``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels._triton import interpreting
from kernels.add_rmsnorm import (add_rmsnorm_bwd, add_rmsnorm_bwd_reference, add_rmsnorm_fwd,
                                 add_rmsnorm_fwd_reference, ternary_add_rmsnorm)
from kernels.packing import n_groups, pack_reference
from kernels.rmsnorm import (add_rmsnorm_bwd_triton, add_rmsnorm_fwd_triton, bwd_programs, rmsnorm_fwd_reference,
                             ternary_rmsnorm, tile_shape)
from tests.kernels.test_rmsnorm import REL_REF, REL_TRITON, assert_rel, cases, oracle


def with_residual(case, seed: int):
    """The case's x split into x - r and r, with a residual gradient gh: h = x is the oracle's input."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(case["x"].shape, generator=g) * case["x"].abs().mean().clamp_min(1e-3)
    return case["x"] - r, r, torch.randn(case["x"].shape, generator=g)


@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_forward_and_backward_against_reference_and_oracle(kernel_device, case, seed):
    x, r, gh = with_residual(case, seed)
    p, e, eps, gs, gy = case["packed"], case["exp"], case["eps"], case["gs"], case["gy"]
    h, y = add_rmsnorm_fwd_reference(x, r, p, e, eps, gs)
    o = oracle({**case, "x": h})  # the float64 norm of the very h the op formed
    assert torch.equal(h, x + r)
    assert_rel(y, o["y"], REL_REF, "reference forward vs float64")
    dh, partials = add_rmsnorm_bwd_reference(gy, gh, h, p, e, eps, gs)
    assert partials.shape == (bwd_programs(h.numel() // case["d"], case["d"])[0], case["d"])
    assert_rel(dh, o["gx"] + gh.double(), REL_REF, "reference dL/dh vs float64", mag=o["gx_mag"] + gh.abs())
    assert_rel(partials.sum(0, keepdim=True), o["gg"], REL_REF, "reference dL/dgain vs float64", mag=o["gg_mag"])

    dev = kernel_device
    th, ty = add_rmsnorm_fwd_triton(x.to(dev), r.to(dev), p.to(dev), e.to(dev), eps, gs)
    assert torch.equal(th.cpu(), h)
    assert_rel(ty, y, REL_TRITON, "Triton forward vs reference", mag=o["y"].abs())
    tdh, tpartials = add_rmsnorm_bwd_triton(gy.to(dev), gh.to(dev), h.to(dev), p.to(dev), e.to(dev), eps, gs)
    assert tpartials.shape == partials.shape
    assert_rel(tdh, dh, REL_TRITON, "Triton dL/dh vs reference", mag=o["gx_mag"] + gh.abs())
    assert_rel(tpartials, partials, REL_TRITON, "Triton partials vs reference", mag=partials.abs() + o["gg_mag"])


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_partials_follow_the_programs_row_chunks(kernel_device, monkeypatch, programs):
    """Capped at ``BWD_PROGRAMS``, each program sums the rows of its chunk (the last partly past the rows): the
    reference's partials are the same chunks."""
    import kernels.rmsnorm as rmsnorm

    monkeypatch.setattr(rmsnorm, "BWD_PROGRAMS", programs)
    g = torch.Generator().manual_seed(programs)
    d, rows = 20, 5 * 16 + 3  # 16 rows a tile at D 20: six tiles, the last one partial
    assert tile_shape(d)[0] == 16
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8))
    e = torch.randint(-2, 2, (1, n_groups(d, 4)), generator=g, dtype=torch.int8)
    gy, gh, h = (torch.randn((rows, d), generator=g) for _ in range(3))
    dh, partials = add_rmsnorm_bwd_reference(gy, gh, h, p, e, 1e-6, 4)
    assert partials.shape == (programs, d)
    chunk = -(-6 // programs) * 16
    terms = gy * rmsnorm_fwd_reference(h, torch.full_like(p, 242), torch.zeros_like(e), 1e-6, 4)  # gain 1: g*xhat
    for i in range(programs):
        assert torch.allclose(partials[i], terms[i * chunk:(i + 1) * chunk].sum(0), rtol=1e-5, atol=1e-5)
    dev = kernel_device
    tdh, tpartials = add_rmsnorm_bwd_triton(gy.to(dev), gh.to(dev), h.to(dev), p.to(dev), e.to(dev), 1e-6, 4)
    assert_rel(tdh, dh, REL_TRITON, "dL/dh")
    assert_rel(tpartials, partials, REL_TRITON, "partials")


def test_bf16_rounds_the_sum_once_as_torch_does(kernel_device):
    """bf16: h is the fp32 sum rounded once, as torch's bf16 ``x + r`` bit for bit on CUDA (the interpreter's
    fp32-to-bf16 cast truncates instead, DESIGN.md §7); y is the norm of that h; the backward's dL/dh is one
    rounding of an fp32 sum (compared on the same h)."""
    dev = kernel_device
    g = torch.Generator().manual_seed(7)
    d, gs = 96, 32
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8)).to(dev)
    e = torch.randint(-2, 2, (1, n_groups(d, gs)), generator=g, dtype=torch.int8).to(dev)
    x, r, gy, gh = (torch.randn((5, 9, d), generator=g).to(dev, torch.bfloat16) for _ in range(4))
    h, y = add_rmsnorm_fwd_triton(x, r, p, e, 1e-6, gs)
    total = x.float() + r.float()
    rounded = (total.view(torch.int32) & -65536).view(torch.float32) if interpreting() else total
    assert h.dtype == y.dtype == torch.bfloat16 and torch.equal(h, rounded.to(torch.bfloat16))
    ref_h, ref_y = add_rmsnorm_fwd_reference(x.cpu(), r.cpu(), p.cpu(), e.cpu(), 1e-6, gs)
    assert torch.equal(ref_h, (x + r).cpu())
    assert_rel(y.float(), ref_y.float(), 1e-2, "bf16 forward")
    dh, partials = add_rmsnorm_bwd_triton(gy, gh, h, p, e, 1e-6, gs)
    ref_dh, ref_partials = add_rmsnorm_bwd_reference(gy.cpu(), gh.cpu(), h.cpu(), p.cpu(), e.cpu(), 1e-6, gs)
    assert dh.dtype == torch.bfloat16 and partials.dtype == torch.float32
    assert_rel(dh.float(), ref_dh.float(), 1e-2, "bf16 dL/dh")
    assert_rel(partials, ref_partials, 1e-5, "bf16 partials")


def _case(seed: int = 0, lead=(3, 7), d: int = 37, gs: int = 6, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = pack_reference(torch.randint(-1, 2, (1, d), generator=g, dtype=torch.int8)).to(device)
    e = torch.randint(-2, 2, (1, n_groups(d, gs)), generator=g, dtype=torch.int8).to(device)
    x, r, wh, wy = (torch.randn((*lead, d), generator=g).to(device, dtype) for _ in range(4))
    return p, e, x, r, wh, wy, d, gs


def _loss(fused: bool, p, e, gs):
    """A loss that weighs both outputs by wh and wy (so both gradients flow), fused or as x + r then the plain
    norm."""
    def loss(probe, x, r, wh, wy):
        if fused:
            h, y = ternary_add_rmsnorm(x, r, p, e, probe, 1e-6, gs)
        else:
            h = x + r
            y = ternary_rmsnorm(h, p, e, probe, 1e-6, gs)
        return (h * wh).sum() + (y * wy).sum()
    return loss


def test_gradients_equal_the_unfused_composition(kernel_device):
    """torch.func.grad wrt probe, x and r, and eager autograd, equal ``x + r`` then ``ternary_rmsnorm``."""
    p, e, x, r, wh, wy, d, gs = _case(device=kernel_device)
    probe = torch.zeros((), device=kernel_device).expand(1, d)
    fused = torch.func.grad(_loss(True, p, e, gs), argnums=(0, 1, 2))(probe, x, r, wh, wy)
    plain = torch.func.grad(_loss(False, p, e, gs), argnums=(0, 1, 2))(probe, x, r, wh, wy)
    for a, b, what in zip(fused, plain, ("probe", "x", "r")):
        assert a.shape == b.shape, what
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), what
    xs, rs, ps = (t.clone().requires_grad_() for t in (x, r, torch.zeros((1, d), device=kernel_device)))
    _loss(True, p, e, gs)(ps, xs, rs, wh, wy).backward()
    for t, b in zip((ps, xs, rs), plain):
        assert torch.allclose(t.grad, b, rtol=1e-5, atol=1e-5)


def test_vmap_forward_and_per_sample_gradients():
    p, e, x, r, wh, wy, d, gs = _case()
    eager = ternary_add_rmsnorm(x, r, p, e, None, 1e-6, gs)
    mapped = torch.func.vmap(lambda xi, ri: ternary_add_rmsnorm(xi, ri, p, e, None, 1e-6, gs))(x, r)
    assert all(torch.equal(a, b) for a, b in zip(mapped, eager))
    one_r = torch.func.vmap(lambda xi: ternary_add_rmsnorm(xi, r[0], p, e, None, 1e-6, gs), in_dims=1, out_dims=1)
    for a, b in zip(one_r(x.transpose(0, 1)), ternary_add_rmsnorm(x, r[0].expand_as(x), p, e, None, 1e-6, gs)):
        assert torch.equal(a, b.transpose(0, 1))

    probe = torch.zeros((1, d))
    per_sample = torch.func.vmap(torch.func.grad(_loss(True, p, e, gs), argnums=(0, 1, 2)),
                                 in_dims=(None, 0, 0, 0, 0))(probe, x, r, wh, wy)
    assert per_sample[0].shape == (x.shape[0], 1, d)
    for i in range(x.shape[0]):
        plain = torch.func.grad(_loss(False, p, e, gs), argnums=(0, 1, 2))(probe, x[i], r[i], wh[i], wy[i])
        for a, b in zip(per_sample, plain):
            assert torch.allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_forward_and_backward(kernel_device):
    """torch.compile(fullgraph=True) of the loss; gradients by autograd.grad outside equal eager."""
    torch._dynamo.reset()
    p, e, x, r, wh, wy, d, gs = _case(1, device=kernel_device)
    f = _loss(True, p, e, gs)
    probe = torch.zeros((1, d), device=kernel_device, requires_grad=True)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    eager = torch.autograd.grad(f(probe, xs, rs, wh, wy), [probe, xs, rs])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(probe, xs, rs, wh, wy), [probe, xs, rs])
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("lead", [(4, 5), (1,), (0, 3)])
def test_opcheck(kernel_device, lead):
    p, e, x, r, wh, wy, d, gs = _case(2, lead=lead, device=kernel_device)
    torch.library.opcheck(add_rmsnorm_fwd, (x, r, p, e, 1e-6, gs))
    torch.library.opcheck(add_rmsnorm_bwd, (wy, wh, x, p, e, 1e-6, gs))


def test_mixed_dtypes_or_shapes_fall_back_to_add_then_norm():
    """x and r of different dtypes (or a broadcast r) take torch's add and the plain norm: same values."""
    p, e, x, r, _, _, d, gs = _case(3)
    for rr in (r.double(), r[0]):
        h, y = ternary_add_rmsnorm(x, rr, p, e, None, 1e-6, gs)
        assert torch.equal(h, x + rr) and torch.equal(y, ternary_rmsnorm(x + rr, p, e, None, 1e-6, gs))


def test_bad_arguments_raise():
    p, e, x, r, _, _, d, gs = _case()
    with pytest.raises(ValueError, match="packed"):
        ternary_add_rmsnorm(x[..., :-3], r[..., :-3], p, e, None, 1e-6, gs)
    with pytest.raises(ValueError, match="exp"):
        ternary_add_rmsnorm(x, r, p, e[:, :-1], None, 1e-6, gs)
    with pytest.raises(ValueError, match="probe"):
        ternary_add_rmsnorm(x, r, p, e, torch.zeros(2, d), 1e-6, gs)
    with pytest.raises(TypeError, match="floating"):
        ternary_add_rmsnorm(x.long(), r.long(), p, e, None, 1e-6, gs)
