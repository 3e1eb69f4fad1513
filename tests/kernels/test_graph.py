"""Graph ops (kernels/graph.py): edge aggregation and gather + residual, Triton vs reference vs float64
loops written here, forward and gradients, vmap and compile.

The edge kernel sums with fp32 atomics (order unspecified), so it is compared with a tolerance scaled by
the magnitude of the summed terms; the gather kernel is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.graph import (
    edge_aggregate,
    edge_aggregate_bwd_reference,
    edge_aggregate_bwd_triton,
    edge_aggregate_reference,
    edge_aggregate_triton,
    gather_residual,
    gather_residual_reference,
    gather_residual_triton,
)

REL = 2e-5  # fp32 sums of at most ~100 terms, relative to the sum of |terms|

# ---------------------------------------------------------------- float64 oracles


def oracle_aggregate(h: np.ndarray, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """agg[v] = sum over edges into v of w_e / max(1, indeg v) * h[src_e], by a plain loop in float64."""
    v = h.shape[0]
    indeg = [0] * v
    for d in dst:
        indeg[d] += 1
    out = np.zeros(h.shape, np.float64)
    for s, d, we in zip(src, dst, w):
        out[d] += we / max(1, indeg[d]) * h[s]
    return out


def oracle_grad_h(g: np.ndarray, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """dL/dh for L = sum(agg * g): grad[src_e] += w_e / max(1, indeg dst_e) * g[dst_e]."""
    indeg = np.bincount(dst, minlength=g.shape[0])
    out = np.zeros(g.shape, np.float64)
    for s, d, we in zip(src, dst, w):
        out[s] += we / max(1, indeg[d]) * g[d]
    return out


def edge_weights(attr: torch.Tensor, score: torch.Tensor) -> np.ndarray:
    return attr.numpy().astype(np.float64) * score.numpy().astype(np.float64) / 127.0


def assert_close_scaled(a: torch.Tensor, b: np.ndarray, mag: np.ndarray, what: str) -> None:
    a = a.detach().cpu().double().numpy()
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = np.abs(a - b)
    bad = err > REL * mag + 1e-30
    assert not bad.any(), f"{what}: max error {err.max():.3g} (at magnitude {mag[bad].max():.3g})"


# ---------------------------------------------------------------- data


@st.composite
def edge_cases(draw):
    v = draw(st.one_of(st.sampled_from((1, 2, 3, 5, 7, 13, 31)), st.integers(1, 40)))
    d = draw(st.one_of(st.sampled_from((1, 2, 5, 7, 13, 31, 64, 65, 67, 130)), st.integers(1, 70)))
    e = draw(st.one_of(st.sampled_from((1, 2, 3, 5, 17, 31, 32, 33, 64, 65, 97)), st.integers(1, 100)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def endpoints(mode: str) -> torch.Tensor:
        if mode == "same":  # every edge shares one endpoint: repeated dst/src
            return torch.full((e,), int(torch.randint(0, v, (), generator=g)), dtype=torch.int32)
        hi = max(1, v // 3) if mode == "few" else v  # "few": most nodes get no edge at this end
        return torch.randint(0, hi, (e,), generator=g, dtype=torch.int32)

    src = endpoints(draw(st.sampled_from(("random", "same", "few"))))
    dst = endpoints(draw(st.sampled_from(("random", "same", "few"))))
    attr_mode = draw(st.sampled_from(("random", "zero", "plus", "minus")))
    attr = {"random": torch.randint(-1, 2, (e,), generator=g, dtype=torch.int8),
            "zero": torch.zeros(e, dtype=torch.int8), "plus": torch.ones(e, dtype=torch.int8),
            "minus": torch.full((e,), -1, dtype=torch.int8)}[attr_mode]
    score_mode = draw(st.sampled_from(("random", "extreme", "small")))
    if score_mode == "extreme":
        choices = torch.tensor([-128, -127, 127, 0], dtype=torch.int8)
        score = choices[torch.randint(0, 4, (e,), generator=g)]
    else:
        lo, hi = (-128, 128) if score_mode == "random" else (-3, 4)
        score = torch.randint(lo, hi, (e,), generator=g, dtype=torch.int8)
    scale = draw(st.sampled_from((1.0, 1e-3, 1e3)))
    h = torch.randn(v, d, generator=g) * scale
    up = torch.randn(v, d, generator=g)
    return h, src, dst, attr, score, up


def _np(*ts):
    return [t.numpy().astype(np.int64) if not t.is_floating_point() else t.double().numpy() for t in ts]


# ---------------------------------------------------------------- edge_aggregate


@settings(max_examples=100)
@given(edge_cases())
def test_edge_aggregate_triton_and_reference_match_float64(kernel_device, case):
    h, src, dst, attr, score, up = case
    h64, src64, dst64, up64 = _np(h, src, dst, up)
    w = edge_weights(attr, score)
    want = oracle_aggregate(h64, src64, dst64, w)
    mag = oracle_aggregate(np.abs(h64), src64, dst64, np.abs(w))
    ref = edge_aggregate_reference(h, src, dst, attr, score)
    assert ref.dtype == torch.float32
    assert_close_scaled(ref, want, mag, "reference forward")
    dev = [t.to(kernel_device) for t in (h, src, dst, attr, score)]
    assert_close_scaled(edge_aggregate_triton(*dev), want, mag, "triton forward")
    no_in_edges = np.bincount(dst64, minlength=h.shape[0]) == 0
    assert bool((ref[torch.from_numpy(no_in_edges)] == 0).all()), "nodes without in-edges must aggregate to 0"

    want_g = oracle_grad_h(up64, src64, dst64, w)
    mag_g = oracle_grad_h(np.abs(up64), src64, dst64, np.abs(w))
    assert_close_scaled(edge_aggregate_bwd_reference(up, src, dst, attr, score), want_g, mag_g, "reference bwd")
    up_dev = up.to(kernel_device)
    assert_close_scaled(edge_aggregate_bwd_triton(up_dev, *dev[1:]), want_g, mag_g, "triton bwd")


@settings(max_examples=60)
@given(edge_cases())
def test_edge_aggregate_gradient_is_float64_transpose(case):
    h, src, dst, attr, score, up = case
    grad = torch.func.grad(lambda x: (edge_aggregate(x, src, dst, attr, score) * up).sum())(h)
    h64, src64, dst64, up64 = _np(h, src, dst, up)
    w = edge_weights(attr, score)
    assert_close_scaled(grad, oracle_grad_h(up64, src64, dst64, w), oracle_grad_h(np.abs(up64), src64, dst64,
                                                                                  np.abs(w)), "grad h")


def test_edge_aggregate_hand_example():
    # edges 0->2 (w = 1*127/127), 1->2 (w = -1*-128/127), 2->0 (attr 0): indeg(2) = 2; node 1 has no in-edge
    h = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    src, dst = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([2, 2, 0], dtype=torch.int32)
    attr, score = torch.tensor([1, -1, 0], dtype=torch.int8), torch.tensor([127, -128, 127], dtype=torch.int8)
    out = edge_aggregate(h, src, dst, attr, score)
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [(1 + 10 * 128 / 127) / 2, (2 + 20 * 128 / 127) / 2]])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- gather_residual


@st.composite
def gather_cases(draw):
    v = draw(st.sampled_from((1, 2, 3, 7, 13, 31)))
    d = draw(st.sampled_from((1, 2, 5, 7, 31, 64, 65, 129)))
    shape = draw(st.sampled_from(((1, 1), (1, 5), (2, 3), (3, 7), (5, 1), (2, 17))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hi = draw(st.sampled_from((1, v)))  # 1: every position gathers node 0 (repeated rows)
    return (torch.randn(*shape, d, generator=g), torch.randn(v, d, generator=g),
            torch.randint(0, hi, shape, generator=g), torch.randn(*shape, d, generator=g))


@settings(max_examples=100)
@given(gather_cases())
def test_gather_residual_triton_reference_float64_and_grads(kernel_device, case):
    x, nodes, idx, up = case
    ref = gather_residual_reference(x, nodes, idx)
    exact = x.double().numpy() + nodes.double().numpy()[idx.numpy()]  # rounds once to fp32 like a float add
    np.testing.assert_array_equal(ref.numpy(), exact.astype(np.float32))
    out = gather_residual_triton(x.to(kernel_device), nodes.to(kernel_device), idx.to(kernel_device))
    assert torch.equal(out.cpu(), ref)

    gx, gn = torch.func.grad(lambda a, b: (gather_residual(a, b, idx) * up).sum(), argnums=(0, 1))(x, nodes)
    assert torch.equal(gx, up)
    want = np.zeros(nodes.shape)
    np.add.at(want, idx.reshape(-1).numpy(), up.reshape(-1, x.shape[-1]).double().numpy())
    np.testing.assert_allclose(gn.numpy(), want, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(nodes.shape[0], dtype=torch.bool)
    untouched[idx.reshape(-1)] = False
    assert bool((gn[untouched] == 0).all()), "rows never gathered must get an exactly zero gradient"


# ---------------------------------------------------------------- vmap, compile, errors


def _small_graph():
    g = torch.Generator().manual_seed(3)
    v, d, e = 11, 7, 29
    src = torch.randint(0, v, (e,), generator=g, dtype=torch.int32)
    dst = torch.randint(0, v, (e,), generator=g, dtype=torch.int32)
    attr = torch.randint(-1, 2, (e,), generator=g, dtype=torch.int8)
    score = torch.randint(-128, 128, (e,), generator=g, dtype=torch.int8)
    return g, torch.randn(v, d, generator=g), src, dst, attr, score


def test_vmap_matches_loop():
    g, h, src, dst, attr, score = _small_graph()
    hs = torch.randn(3, *h.shape, generator=g)
    agg = lambda a: edge_aggregate(a, src, dst, attr, score)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(agg)(hs), torch.stack([agg(a) for a in hs]))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda a: agg(a).square().sum()))(hs),
                               torch.stack([torch.func.grad(lambda a: agg(a).square().sum())(a) for a in hs]))

    idx = torch.randint(0, h.shape[0], (2, 5), generator=g)
    xs = torch.randn(4, 2, 5, h.shape[1], generator=g)
    gr = lambda x: gather_residual(x, h, idx)  # noqa: E731
    assert torch.equal(torch.func.vmap(gr)(xs), torch.stack([gr(x) for x in xs]))
    idxs = torch.randint(0, h.shape[0], (4, 2, 5), generator=g)
    both = torch.func.vmap(gather_residual, in_dims=(0, None, 0))(xs, h, idxs)
    assert torch.equal(both, torch.stack([gather_residual(x, h, i) for x, i in zip(xs, idxs)]))
    only_idx = torch.func.vmap(gather_residual, in_dims=(None, None, 0))(xs[0], h, idxs)
    assert torch.equal(only_idx, torch.stack([gather_residual(xs[0], h, i) for i in idxs]))
    hs_n = torch.randn(4, *h.shape, generator=g)  # batched nodes: one launch per sample
    per_nodes = torch.func.vmap(gather_residual, in_dims=(0, 0, None))(xs, hs_n, idx)
    assert torch.equal(per_nodes, torch.stack([gather_residual(x, n, idx) for x, n in zip(xs, hs_n)]))
    scores = torch.randint(-128, 128, (3, score.numel()), generator=g, dtype=torch.int8)  # batched edges
    per_edges = torch.func.vmap(lambda s: edge_aggregate(h, src, dst, attr, s))(scores)
    torch.testing.assert_close(per_edges, torch.stack([edge_aggregate(h, src, dst, attr, s) for s in scores]))
    grad_nodes = torch.func.grad(lambda n, x: gather_residual(x, n, idx).square().sum())
    per_sample = torch.func.vmap(grad_nodes, in_dims=(None, 0))(h, xs)
    torch.testing.assert_close(per_sample, torch.stack([grad_nodes(h, x) for x in xs]))


def test_compile_fullgraph_matches_eager():
    g, h, src, dst, attr, score = _small_graph()
    idx = torch.randint(0, h.shape[0], (2, 5), generator=g)
    x = torch.randn(2, 5, h.shape[1], generator=g)

    def f(h, x):
        return gather_residual(x, edge_aggregate(h, src, dst, attr, score), idx).square().sum()

    h_e, x_e = h.clone().requires_grad_(), x.clone().requires_grad_()
    out_e = f(h_e, x_e)
    grads_e = torch.autograd.grad(out_e, [h_e, x_e])
    h_c, x_c = h.clone().requires_grad_(), x.clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True)(h_c, x_c)
    grads_c = torch.autograd.grad(out_c, [h_c, x_c])
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise():
    _, h, src, dst, attr, score = _small_graph()
    with pytest.raises(TypeError, match="src"):
        edge_aggregate(h, src.long(), dst, attr, score)
    with pytest.raises(TypeError, match="score"):
        edge_aggregate(h, src, dst, attr, score[:-1])
    with pytest.raises(TypeError, match="h must be"):
        edge_aggregate(h[0], src, dst, attr, score)
    with pytest.raises(ValueError, match="edge endpoints"):
        edge_aggregate(h, src, dst + h.shape[0], attr, score)
    x, idx = torch.randn(2, 3, h.shape[1]), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="idx"):
        gather_residual(x, h, idx.int())
    with pytest.raises(TypeError, match="nodes"):
        gather_residual(x, h[:, :-1], idx)
    with pytest.raises(ValueError, match="idx must be in"):
        gather_residual(x, h, idx - 1)
