"""ACT halting loops (arbfn/loops.py): the eager and fixed-step variants agree on every input, including
items that halt at step 1, items that never halt, and mixed batches; and the ACT bookkeeping is right."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arbfn.loops import act_eager, act_fixed

HALT_KINDS = ("at_once", "never", "random")


def make_step(kinds: list[str], seed: int):
    """A step function whose per-item halting probability follows ``kinds``: 1.0 (halts at step 1),
    1e-3 (never reaches the threshold), or a fixed random value per (step, item)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(16, len(kinds), generator=g) * 0.7 + 0.05
    mix = torch.randn(5, 5, generator=g) * 0.5

    def step(i: int, x: torch.Tensor):
        p = torch.stack([torch.tensor(1.0) if k == "at_once" else torch.tensor(1e-3) if k == "never"
                         else table[i, j] for j, k in enumerate(kinds)])
        return torch.tanh(x @ mix) + 0.1 * (i + 1), p

    return step


@given(st.lists(st.sampled_from(HALT_KINDS), min_size=1, max_size=9), st.integers(1, 8),
       st.sampled_from((0.5, 0.9, 0.99, 1.0)), st.integers(0, 2**16))
def test_eager_and_fixed_agree(kinds, max_steps, threshold, seed):
    x = torch.randn(len(kinds), 5, generator=torch.Generator().manual_seed(seed))
    step = make_step(kinds, seed)
    e, f = act_eager(step, x, max_steps, threshold), act_fixed(step, x, max_steps, threshold)
    for name in ("output", "state", "steps", "remainder", "ponder"):
        assert torch.equal(getattr(e, name), getattr(f, name)), name
    for j, k in enumerate(kinds):
        if k == "at_once":
            assert int(e.steps[j]) == 1 and float(e.remainder[j]) == 1.0
        if k == "never":
            assert int(e.steps[j]) == max_steps
    assert bool((e.steps >= 1).all()) and bool((e.steps <= max_steps).all())
    assert bool((e.remainder > 0).all()) and bool((e.remainder <= 1).all())
    assert torch.allclose(e.ponder, e.steps.float() + e.remainder)


def test_weights_sum_to_one_per_item():
    """The output is a convex combination of per-step states: with a constant state it returns that state."""
    x = torch.full((4, 3), 2.5)
    res = act_eager(lambda i, s: (s, torch.tensor([0.3, 0.6, 1.0, 0.01])), x, max_steps=5, threshold=0.99)
    assert torch.allclose(res.output, x)
    assert res.steps.tolist() == [4, 2, 1, 5]


@pytest.mark.parametrize("max_steps, threshold", [(0, 0.99), (3, 0.0), (3, 1.5)])
def test_bad_arguments(max_steps, threshold):
    with pytest.raises(ValueError):
        act_fixed(lambda i, s: (s, torch.ones(1)), torch.zeros(1, 2), max_steps, threshold)


def test_fixed_loop_compiles_without_graph_breaks():
    step = make_step(["random", "at_once", "never"], 0)
    x = torch.randn(3, 5)
    compiled = torch.compile(lambda x: act_fixed(step, x, 4, 0.9).output, fullgraph=True)
    assert torch.allclose(compiled(x), act_eager(step, x, 4, 0.9).output, atol=1e-6)
