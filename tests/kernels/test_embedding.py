"""Ternary embedding (kernels/embedding.py): gather kernel vs reference vs a float64 formula, and the
sparse-in-content weight-gradient signal (only the gathered rows are non-zero)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.embedding import embedding_fwd_reference, embedding_fwd_triton, ternary_embedding
from kernels.packing import n_groups, pack_reference

GROUP_SIZES = (4, 6, 8, 16, 32, 64, 96)


def float64_rows(trits: np.ndarray, exp: np.ndarray, ids: np.ndarray, gs: int) -> np.ndarray:
    """Independent oracle: rows T[ids] * 2**E[ids, col // gs] in float64 from unpacked trits."""
    cols = np.arange(trits.shape[1])
    w = trits.astype(np.float64) * np.exp2(exp.astype(np.float64)[:, cols // gs])
    return w[ids]


@st.composite
def tables(draw):
    rows = draw(st.sampled_from((1, 2, 3, 7, 13, 31, 64, 297)))
    dim = draw(st.sampled_from((1, 2, 5, 7, 11, 31, 32, 33, 64, 97, 130, 257)))
    gs = draw(st.sampled_from(GROUP_SIZES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (rows, dim), generator=g, dtype=torch.int8)
    lo = draw(st.integers(-30, 0))
    exp = torch.randint(lo, lo + 12, (rows, n_groups(dim, gs)), generator=g, dtype=torch.int8)
    shape = draw(st.sampled_from(((1,), (5,), (3, 7), (2, 1, 4))))
    ids = torch.randint(0, rows, shape, generator=g)
    return trits, exp, ids, gs


@given(tables())
def test_triton_matches_reference_and_float64(kernel_device, case):
    trits, exp, ids, gs = case
    packed, dim = pack_reference(trits), trits.shape[1]
    ref = embedding_fwd_reference(ids, packed, exp, dim, gs)
    out = embedding_fwd_triton(ids.to(kernel_device), packed.to(kernel_device), exp.to(kernel_device), dim, gs)
    assert out.shape == (*ids.shape, dim) and out.dtype == torch.float32
    assert torch.equal(out.cpu(), ref), "gathered rows are exact (trit * power of two) and must match bit for bit"
    oracle = float64_rows(trits.numpy(), exp.numpy(), ids.reshape(-1).numpy(), gs).reshape(*ids.shape, dim)
    np.testing.assert_array_equal(ref.double().numpy(), oracle)


@given(tables())
def test_probe_gradient_is_index_add_of_output_gradient(case):
    trits, exp, ids, gs = case
    packed, dim = pack_reference(trits), trits.shape[1]
    upstream = torch.randn(*ids.shape, dim, generator=torch.Generator().manual_seed(int(ids.sum())))
    probe = torch.zeros(()).expand(trits.shape[0], dim)

    def loss(p):
        return (ternary_embedding(ids, packed, exp, p, dim, gs) * upstream).sum()

    grad = torch.func.grad(loss)(probe)
    expected = np.zeros((trits.shape[0], dim))
    np.add.at(expected, ids.reshape(-1).numpy(), upstream.reshape(-1, dim).double().numpy())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(trits.shape[0], dtype=torch.bool)
    untouched[ids.reshape(-1)] = False
    assert bool((grad[untouched] == 0).all()), "rows that were not gathered must get an exactly zero signal"


def test_vmap_and_compile_match_eager():
    g = torch.Generator().manual_seed(0)
    trits = torch.randint(-1, 2, (11, 37), generator=g, dtype=torch.int8)
    packed, exp = pack_reference(trits), torch.randint(-4, 2, (11, n_groups(37, 6)), generator=g, dtype=torch.int8)
    ids = torch.randint(0, 11, (4, 9), generator=g)
    eager = ternary_embedding(ids, packed, exp, None, 37, 6)
    batched = torch.func.vmap(lambda i: ternary_embedding(i, packed, exp, None, 37, 6))(ids)
    assert torch.equal(batched, eager)
    probe = torch.zeros(11, 37, requires_grad=True)
    f = lambda p: ternary_embedding(ids, packed, exp, p, 37, 6).square().sum()  # noqa: E731
    (g_eager,) = torch.autograd.grad(f(probe), [probe])
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(probe)
    (g_comp,) = torch.autograd.grad(out, [probe])
    assert torch.equal(out, f(probe)) and torch.equal(g_comp, g_eager)
