"""MoE route-combine (kernels/moe.py): Triton kernels vs references vs float64 formulas, the autograd
Function's gradients, vmap (batched expert outputs and/or weights) and compile(fullgraph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.moe import (
    route_combine,
    route_combine_bwd_expert_reference,
    route_combine_bwd_expert_triton,
    route_combine_bwd_weights_reference,
    route_combine_bwd_weights_triton,
    route_combine_reference,
    route_combine_triton,
)

E_EDGES = (1, 2, 3, 5, 8)
N_EDGES = (1, 2, 3, 7, 13, 16, 17, 31)
D_EDGES = (1, 2, 5, 7, 11, 31, 64, 65, 97)
REL = 1e-5 if not torch.cuda.is_available() else 1e-4  # fp32 sums in a different order


def oracle(x: np.ndarray, w: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent float64 forward, expert gradient and weight gradient by explicit loops over experts."""
    x, w, g = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    y = np.zeros(x.shape[1:])
    gx = np.zeros(x.shape)
    gw = np.zeros(w.shape)
    for e in range(x.shape[0]):
        y += w[:, e:e + 1] * x[e]
        gx[e] = w[:, e:e + 1] * g
        gw[:, e] = (x[e] * g).sum(axis=1)
    return y, gx, gw


def close(a: torch.Tensor, b: np.ndarray | torch.Tensor, mag: np.ndarray, what: str, tol: float = REL) -> None:
    """``|a - b| <= tol * mag`` elementwise, where ``mag`` bounds the summed absolute terms."""
    a = a.detach().cpu().double().numpy()
    b = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    bad = np.abs(a - b) > tol * mag + 1e-30
    assert not bad.any(), f"{what}: {int(bad.sum())} entries off, max diff {np.abs(a - b).max():.3g}"


@st.composite
def cases(draw):
    e, n, d = draw(st.sampled_from(E_EDGES)), draw(st.sampled_from(N_EDGES)), draw(st.sampled_from(D_EDGES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from((1.0, 1e-3, 1e3)))
    x = torch.randn(e, n, d, generator=g) * scale
    w = torch.softmax(torch.randn(n, e, generator=g), -1)
    if draw(st.booleans()):  # top-k style: zero weights where unselected
        w = w * (torch.rand(n, e, generator=g) < 0.5)
    up = torch.randn(n, d, generator=g)
    return x, w, up


def magnitudes(x, w, g):
    """Bounds on the summed absolute terms of each output (float64)."""
    ax, aw, ag = (t.abs().double().numpy() for t in (x, w, g))
    return oracle(ax, aw, ag)


@settings(max_examples=80)
@given(cases())
def test_triton_matches_reference_and_float64(kernel_device, case):
    x, w, g = case
    ref = (route_combine_reference(x, w), route_combine_bwd_expert_reference(g, w),
           route_combine_bwd_weights_reference(g, x))
    xd, wd, gd = x.to(kernel_device), w.to(kernel_device), g.to(kernel_device)
    tri = (route_combine_triton(xd, wd), route_combine_bwd_expert_triton(gd, wd),
           route_combine_bwd_weights_triton(gd, xd))
    mags = magnitudes(x, w, g)
    for name, r, t, o, m in zip(("forward", "grad_expert", "grad_weights"), ref, tri, oracle(x.numpy(), w.numpy(),
                                                                                         g.numpy()), mags):
        assert t.dtype == r.dtype == torch.float32
        close(t, r, m, f"{name}: triton vs reference")
        close(r, o, m, f"{name}: reference vs float64")
    assert torch.equal(tri[1].cpu(), ref[1]), "grad_expert is one product per element: exact"


@settings(max_examples=60)
@given(cases())
def test_autograd_gradients_match_float64(case):
    x, w, g = case
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = route_combine(xr, wr)
    gx, gw = torch.autograd.grad(y, [xr, wr], g)
    fy, fgx, fgw = oracle(x.numpy(), w.numpy(), g.numpy())
    my, mgx, mgw = magnitudes(x, w, g)
    close(y, fy, my, "forward")
    close(gx, fgx, mgx, "grad_expert")
    close(gw, fgw, mgw, "grad_weights")
    fgx2, fgw2 = torch.func.grad(lambda a, b: (route_combine(a, b) * g).sum(), argnums=(0, 1))(x, w)
    assert torch.equal(fgx2, gx) and torch.equal(fgw2, gw), "torch.func.grad must match autograd"


def _batch(seed: int = 0, b: int = 3, e: int = 5, n: int = 7, d: int = 11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, e, n, d, generator=g), torch.randn(b, n, e, generator=g), torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
def test_vmap_matches_loop_forward_and_grads(in_dims):
    xs, ws, gs = _batch()
    pick = lambda t, d, i: t[i] if d == 0 else t[0]  # noqa: E731

    def loss(x, w, g):
        return (route_combine(x, w) * g).sum()

    grad_fn = torch.func.grad(loss, argnums=(0, 1))
    y = torch.func.vmap(route_combine, in_dims=in_dims)(xs if in_dims[0] == 0 else xs[0],
                                                       ws if in_dims[1] == 0 else ws[0])
    gx, gw = torch.func.vmap(grad_fn, in_dims=(*in_dims, 0))(xs if in_dims[0] == 0 else xs[0],
                                                             ws if in_dims[1] == 0 else ws[0], gs)
    for i in range(xs.shape[0]):
        x, w = pick(xs, in_dims[0], i), pick(ws, in_dims[1], i)
        ex, ew = grad_fn(x, w, gs[i])
        assert torch.allclose(y[i], route_combine(x, w), rtol=1e-6, atol=1e-6)
        assert torch.allclose(gx[i], ex, rtol=1e-6, atol=1e-6) and torch.allclose(gw[i], ew, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_matches_eager():
    x, w, g = (t[0] for t in _batch(1))
    x, w = x.requires_grad_(), w.requires_grad_()
    f = lambda a, b: (route_combine(a, b) * g).sum()  # noqa: E731
    out_e = f(x, w)
    grads_e = torch.autograd.grad(out_e, [x, w])
    out_c = torch.compile(f, fullgraph=True)(x, w)
    grads_c = torch.autograd.grad(out_c, [x, w])
    assert torch.allclose(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_low_precision_dtypes_follow_inputs():
    x, w, g = (t[0] for t in _batch(2))
    xb, wr = x.bfloat16().requires_grad_(), w.clone().requires_grad_()
    y = route_combine(xb, wr)
    gx, gw = torch.autograd.grad(y, [xb, wr], g.bfloat16())
    assert y.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32


def test_bad_inputs_raise():
    x, w = torch.randn(3, 4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match="weights must be"):
        route_combine(x, w.t())
    with pytest.raises(ValueError, match="expects"):
        route_combine(x[0], w)
    with pytest.raises(TypeError, match="float"):
        route_combine(x, w.long())
