"""Ternary conv1d / conv_transpose1d (arbfn/layers/conv.py) against F.conv1d / F.conv_transpose1d on the
decoded weight in float64: outputs, probe (weight) gradients in our layout, input gradients; init and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from arbfn.layers.conv import conv1d, conv_transpose1d, init_conv1d, init_conv_transpose1d
from arbfn.ternary import attach_probes, decode, make_probes, weights

INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
REL = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel(a: torch.Tensor, b: torch.Tensor, mag: torch.Tensor, what: str) -> None:
    """``‖a - b‖ / ‖mag‖ <= REL`` where ``mag`` is the same computation on absolute values (fp32 sums err
    in proportion to the magnitude of their terms)."""
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    num, den = float((a.double() - b.double()).norm()), float(mag.double().norm())
    err = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
    assert err <= REL, f"{what}: relative error {err:.3g} > {REL}"


def grads_of(params, fn, x):
    """(output, dL/dprobe per weight, dL/dx) for L = sum(fn(params with probes, x) * upstream)."""
    probes = make_probes(params)
    leaves, spec = pytree.tree_flatten(probes)
    out = fn(attach_probes(params, probes), x)
    up = torch.randn(out.shape, generator=gen(7), dtype=torch.float64)

    def loss(leaves, x):
        return (fn(attach_probes(params, pytree.tree_unflatten(leaves, spec)), x) * up).sum()

    g_probes, g_x = torch.func.grad(loss, argnums=(0, 1))(leaves, x)
    return out, g_probes, g_x, up


def f64_grads(f, x, w, up):
    """Output, dL/dW and dL/dx of ``f(x, W)`` in float64 autograd, plus the same on |x|, |W| (magnitudes)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = f(x, w)
    gx, gw = torch.autograd.grad((y * up).sum(), [x, w])
    xa, wa = x.detach().abs().requires_grad_(), w.detach().abs().requires_grad_()
    ya = f(xa, wa)
    gxa, gwa = torch.autograd.grad((ya * up.abs()).sum(), [xa, wa])
    return y.detach(), gw, gx, ya.detach(), gwa, gxa


shape_args = dict(b=st.integers(1, 2), c_in=st.integers(1, 5), c_out=st.integers(1, 5), k=st.integers(1, 5),
                  length=st.integers(1, 12), stride=st.integers(1, 3), padding=st.integers(0, 2),
                  gs=st.sampled_from((4, 6, 8)), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=60)
@given(dilation=st.integers(1, 3), **shape_args)
def test_conv1d_matches_f_conv1d(b, c_in, c_out, k, length, stride, padding, gs, seed, dilation):
    assume(length + 2 * padding >= dilation * (k - 1) + 1)
    p = init_conv1d(c_in, c_out, k, gs, gen(seed))
    x = torch.randn((b, c_in, length), generator=gen(seed + 1), dtype=torch.float64)
    fn = lambda p, x: conv1d(p, x, stride=stride, padding=padding, dilation=dilation)  # noqa: E731
    out, (g_w,), g_x, up = grads_of(p, fn, x)
    w64 = decode(p["w"], torch.float64).reshape(c_out, c_in, k)
    f = lambda x, w: F.conv1d(x, w, stride=stride, padding=padding, dilation=dilation)  # noqa: E731
    y, gw, gx, ya, gwa, gxa = f64_grads(f, x, w64, up)
    assert out.dtype == torch.float64
    assert_rel(out, y, ya, "conv1d forward")
    assert g_w.shape == (c_out, c_in * k)
    assert_rel(g_w, gw.reshape(c_out, c_in * k), gwa.reshape(c_out, c_in * k), "conv1d weight gradient")
    assert_rel(g_x, gx, gxa, "conv1d input gradient")


@settings(max_examples=60)
@given(output_padding=st.integers(0, 2), **shape_args)
def test_conv_transpose1d_matches_f_conv_transpose1d(b, c_in, c_out, k, length, stride, padding, gs, seed,
                                                     output_padding):
    assume(output_padding < stride and (length - 1) * stride + k + output_padding - 2 * padding >= 1)
    p = init_conv_transpose1d(c_in, c_out, k, gs, gen(seed))
    x = torch.randn((b, c_in, length), generator=gen(seed + 1), dtype=torch.float64)
    fn = lambda p, x: conv_transpose1d(p, x, stride, padding, output_padding, kernel_size=k)  # noqa: E731
    out, (g_w,), g_x, up = grads_of(p, fn, x)
    w64 = decode(p["w"], torch.float64).reshape(c_out, k, c_in).permute(2, 0, 1)  # -> [c_in, c_out, k]
    f = lambda x, w: F.conv_transpose1d(x, w, stride=stride, padding=padding, output_padding=output_padding)  # noqa: E731
    y, gw, gx, ya, gwa, gxa = f64_grads(f, x, w64, up)
    assert out.dtype == torch.float64
    assert_rel(out, y, ya, "conv_transpose1d forward")
    ours = lambda t: t.permute(1, 2, 0).reshape(c_out * k, c_in)  # noqa: E731  [c_in, c_out, k] -> our rows
    assert g_w.shape == (c_out * k, c_in)
    assert_rel(g_w, ours(gw), ours(gwa), "conv_transpose1d weight gradient")
    assert_rel(g_x, gx, gxa, "conv_transpose1d input gradient")


def test_float32_shapes_and_compile():
    p = init_conv1d(3, 4, 3, 4, gen(0))
    x = torch.randn((2, 3, 11), generator=gen(1))
    y = conv1d(p, x, stride=2, padding=1)
    assert y.shape == (2, 4, 6) and y.dtype == torch.float32
    assert torch.equal(torch.compile(lambda x: conv1d(p, x, stride=2, padding=1), fullgraph=True)(x), y)
    pt = init_conv_transpose1d(4, 3, 3, 4, gen(2))
    z = conv_transpose1d(pt, y, stride=2, padding=1, output_padding=1, kernel_size=3)
    assert z.shape == (2, 3, 12) and z.dtype == torch.float32


@pytest.mark.parametrize("init", ["conv", "transpose"])
def test_init_integer_deterministic_meta(init):
    make = init_conv1d if init == "conv" else init_conv_transpose1d
    p = make(3, 5, 4, 6, gen(3))
    shape = (5, 12) if init == "conv" else (20, 3)
    assert (p["w"].out_features, p["w"].in_features) == shape
    leaves = [t for t in pytree.tree_leaves(p) if isinstance(t, torch.Tensor)]
    assert leaves and all(t.dtype in INTEGER_DTYPES for t in leaves), "params must hold no float tensor"
    q = make(3, 5, 4, 6, gen(3))
    tensors = lambda t: [v for v in pytree.tree_leaves(t) if isinstance(v, torch.Tensor)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(tensors(p), tensors(q)))
    assert not torch.equal(p["w"].packed, make(3, 5, 4, 6, gen(4))["w"].packed)
    meta = make(3, 5, 4, 6, None)
    assert all(t.device.type == "meta" for t in pytree.tree_leaves(meta) if isinstance(t, torch.Tensor))
    assert [w.packed.shape for w in weights(meta)] == [w.packed.shape for w in weights(p)]


def test_errors():
    p, pt = init_conv1d(3, 4, 3, 4, gen(0)), init_conv_transpose1d(3, 4, 3, 4, gen(0))
    x = torch.randn(2, 3, 8)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="kernel_size"):
            init_conv1d(3, 4, bad, 4, gen(0))
        with pytest.raises(ValueError, match="c_out"):
            init_conv_transpose1d(3, bad, 3, 4, gen(0))
        with pytest.raises(ValueError, match="stride"):
            conv1d(p, x, stride=bad)
        with pytest.raises(ValueError, match="stride"):
            conv_transpose1d(pt, x, stride=bad, kernel_size=3)
    with pytest.raises(ValueError, match="dilation"):
        conv1d(p, x, dilation=0)
    with pytest.raises(ValueError, match="padding"):
        conv1d(p, x, padding=-1)
    with pytest.raises(ValueError, match="padding"):
        conv_transpose1d(pt, x, padding=-1, kernel_size=3)
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose1d(pt, x, stride=2, output_padding=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"\[B, C_in, L\]"):
        conv1d(p, x[0])
    with pytest.raises(ValueError, match=r"\[B, C_in, L\]"):
        conv_transpose1d(pt, x[0], kernel_size=3)
    with pytest.raises(ValueError, match="channels"):
        conv1d(p, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="channels"):
        conv_transpose1d(pt, torch.randn(2, 5, 8), kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size"):
        conv_transpose1d(pt, x, kernel_size=5)
    with pytest.raises(ValueError, match="shorter"):
        conv1d(p, torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="output length"):
        conv_transpose1d(pt, torch.randn(2, 3, 1), padding=2, kernel_size=3)
    with pytest.raises(TypeError, match="floating"):
        conv1d(p, x.long())
