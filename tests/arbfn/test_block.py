"""The fused residual blocks (arbfn/layers/block.py) against the plain pre-norm formula, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn.layers.attention import attention
from arbfn.layers.block import blocks, init_block
from arbfn.layers.mlp import mlp
from arbfn.layers.norm import rmsnorm
from arbfn.ternary import attach_probes, make_probes

D, D_FF, HEADS, GROUP = 24, 40, 2, 8


def unfused(ps, x):
    """``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``, block after block: the adds in torch."""
    for p in ps:
        x = x + attention(p["attn"], rmsnorm(p["norm1"], x), HEADS)
        x = x + mlp(p["mlp"], rmsnorm(p["norm2"], x))
    return x


@pytest.mark.parametrize("n_blocks", [0, 1, 3])
def test_fused_blocks_equal_the_plain_formula(n_blocks):
    g = torch.Generator().manual_seed(n_blocks)
    ps = [init_block(D, D_FF, GROUP, g) for _ in range(n_blocks)]
    x = torch.randn((2, 5, D), generator=g)
    w = torch.randn((2, 5, D), generator=g)
    assert torch.equal(blocks(ps, x, HEADS), unfused(ps, x))
    if not n_blocks:
        return

    def loss(f, probes, x):
        return (f(attach_probes(ps, probes), x) * w).sum()

    probes = make_probes(ps)
    fused_g = torch.func.grad(lambda pr, x: loss(lambda q, x: blocks(q, x, HEADS), pr, x), argnums=(0, 1))(probes, x)
    plain_g = torch.func.grad(lambda pr, x: loss(unfused, pr, x), argnums=(0, 1))(probes, x)
    leaves_f, leaves_p = pytree.tree_leaves(fused_g), pytree.tree_leaves(plain_g)
    assert len(leaves_f) == len(leaves_p) > 1
    for a, b in zip(leaves_f, leaves_p):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
