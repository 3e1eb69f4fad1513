"""Tests of arbfn.model: the byte model's init/apply pair, its state pytree, and its input checks."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn.config import ModelConfig, preset
from arbfn.data import VOCAB_SIZE
from arbfn.model import State, apply_model, init_model
from arbfn.ternary import TernaryWeight, is_ternary, validate_weight, weights

CFG = preset("tiny")
INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def state() -> State:
    return init_model(CFG, gen(0))


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (b, t), generator=gen(seed))


def tensor_leaves(tree) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def assert_states_equal(a: State, b: State) -> None:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("b,t", [(1, 1), (2, 16), (3, 64)])
def test_apply_shapes_and_dtype(state, b, t):
    logits = apply_model(state, ids(b, t))
    assert logits.shape == (b, t, 297) and VOCAB_SIZE == 297
    assert logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())


def test_int32_ids_give_the_same_logits(state):
    x = ids(2, 8)
    assert torch.equal(apply_model(state, x.to(torch.int32)), apply_model(state, x))


def test_state_structure(state):
    assert isinstance(state, State) and state.config == CFG.model
    assert state.step.dtype == torch.int64 and state.step.shape == () and int(state.step) == 0
    p = state.params
    assert set(p) == {"text", "blocks", "memory", "bridge", "vq", "graph", "moe", "norm", "router", "head", "video",
                      "talker"} and len(p["blocks"]) == CFG.model.n_layers
    assert (p["head"].out_features, p["head"].in_features) == (VOCAB_SIZE, CFG.model.d_model)
    assert (p["text"]["embed"].out_features, p["text"]["embed"].in_features) == (VOCAB_SIZE, CFG.model.d_embed)
    for i, w in enumerate(weights(state.params)):
        validate_weight(w, f"weight {i}")
        assert w.group_size == CFG.model.group_size


def test_no_float_tensor_anywhere_in_the_state(state):
    leaves = tensor_leaves(state)
    n_weights = len(weights(state.params))
    counters = ("vq.usage", "graph.src", "graph.dst", "graph.attr", "graph.score", "memory.memgram.strength")
    # packed, exp, t_accum, e_accum per weight, the integer counters, plus the step
    assert len(leaves) == 4 * n_weights + len(counters) + 1
    bad = [(pytree.keystr(path), leaf.dtype) for path, leaf in pytree.tree_flatten_with_path(state)[0]
           if isinstance(leaf, torch.Tensor) and leaf.dtype not in INTEGER_DTYPES]
    assert bad == []
    assert all(w.probe is None for w in weights(state.params)), "probes are never persistent"


def test_init_is_deterministic_for_a_generator(state):
    assert_states_equal(state, init_model(CFG, gen(0)))
    other = init_model(CFG, gen(1))
    assert not torch.equal(other.params["head"].packed, state.params["head"].packed)


def test_apply_is_deterministic(state):
    x = ids(2, 32)
    a, b = apply_model(state, x), apply_model(init_model(CFG, gen(0)), x)
    assert torch.equal(a, b) and torch.equal(apply_model(state, x), a)


def test_apply_is_causal(state):
    x = ids(2, 24)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % VOCAB_SIZE
    a, b = apply_model(state, x), apply_model(state, y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_init_accepts_model_config_and_meta(state):
    a = init_model(CFG.model, gen(0))  # a bare ModelConfig: zero flip counters, the Config's weights
    undithered = dataclasses.replace(CFG, update=dataclasses.replace(CFG.update, dither=False))
    assert_states_equal(a, init_model(undithered, gen(0)))
    for w, v in zip(weights(a.params), weights(state.params)):
        assert torch.equal(w.packed, v.packed) and torch.equal(w.exp, v.exp)
    meta = init_model(CFG)
    assert all(t.device.type == "meta" for t in tensor_leaves(meta))
    assert pytree.tree_structure(meta) == pytree.tree_structure(state)
    for m, s in zip(tensor_leaves(meta), tensor_leaves(state)):
        assert m.shape == s.shape and m.dtype == s.dtype


def test_other_shapes_follow_the_config():
    m = ModelConfig(d_embed=20, window=2, d_model=24, n_layers=1, n_heads=3, d_ff=40, max_context=16, group_size=8)
    s = init_model(m, gen(0))
    assert len(s.params["blocks"]) == 1 and s.params["text"]["proj"].in_features == 40
    assert apply_model(s, ids(2, 16)).shape == (2, 16, VOCAB_SIZE)


def test_state_is_a_pytree_round_trip(state):
    leaves, spec = pytree.tree_flatten(state)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, State) and back.config == state.config
    assert_states_equal(back, state)
    assert sum(isinstance(x, TernaryWeight) for x in pytree.tree_leaves(state.params, is_leaf=is_ternary)) == \
        len(weights(state.params))


@pytest.mark.parametrize(
    "batch,exc,match",
    [
        (torch.tensor([[0, 1, 297]]), ValueError, r"token ids must be in 0\.\.296, got range 0\.\.297"),
        (torch.tensor([[5, -1, 2]]), ValueError, r"token ids must be in 0\.\.296, got range -1\.\.5"),
        (torch.tensor([1, 2, 3]), ValueError, r"batch must be \[batch, time\], got shape \(3,\)"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), ValueError, r"batch must be \[batch, time\], got shape \(2, 3, 4\)"),
        (torch.zeros(0, 8, dtype=torch.int64), ValueError, r"batch is empty \(shape \(0, 8\)\)"),
        (torch.zeros(2, 0, dtype=torch.int64), ValueError, r"batch is empty"),
        (torch.zeros(2, 8), TypeError, r"integer tensor of token ids, got Tensor of torch\.float32"),
        (torch.zeros(2, 8, dtype=torch.bool), TypeError, r"integer tensor of token ids"),
        ([[1, 2, 3]], TypeError, r"integer tensor of token ids, got list"),
        (torch.zeros(1, 65, dtype=torch.int64), ValueError, r"sequence length 65 exceeds max_context 64"),
    ],
)
def test_bad_inputs_give_clear_errors(state, batch, exc, match):
    with pytest.raises(exc, match=match):
        apply_model(state, batch)
