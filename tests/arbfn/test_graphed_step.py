"""The CUDA-graph train step (arbfn/graphed.py) gives the compiled step's new state and stays pure."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arbfn import data
from arbfn.compiled import CompiledTrainStep
from arbfn.config import UpdateConfig, preset
from arbfn.graphed import GraphedTrainStep
from arbfn.model import State, init_model
from arbfn.ternary import TernaryWeight, to_device, weights
from tests.arbfn.test_compiled_step import differing_elements, same_step

CFG = dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_threshold=1, exp_threshold=1))  # every vote acts
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def cuda_state(cfg=CFG) -> State:
    s = init_model(cfg, torch.Generator().manual_seed(0))
    return State(to_device(s.params, "cuda"), s.step.cuda(), s.config)


def batches(n: int, batch: int = 2, context: int = 32) -> list[torch.Tensor]:
    corpus = data.load_corpus()
    return [data.sample_batch(corpus, batch, context, torch.Generator().manual_seed(s)).cuda() for s in range(n)]


def test_cpu_state_is_rejected():
    state = init_model(CFG, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one CUDA device"):
        GraphedTrainStep(CFG)(state, torch.zeros(1, 4, dtype=torch.int64))


def test_sparse_moe_batch_is_rejected():
    state = init_model(CFG, torch.Generator().manual_seed(0))
    tokens = CFG.model.moe.dense_limit + 1
    with pytest.raises(ValueError, match="dense dispatch"):
        GraphedTrainStep(CFG)(state, torch.zeros(1, tokens, dtype=torch.int64))


@cuda
def test_graphed_step_matches_compiled():
    """Same kernels as the compiled step, so the same new state; as in test_compiled_step, a float reduction
    order (here the attention backward's atomics) may move a vote at rounding level on later steps."""
    compiled = CompiledTrainStep(CFG)
    graphed = GraphedTrainStep(CFG, compiled)
    state = cuda_state()
    n_weights = sum(w.num_weights for w in weights(state.params))
    for b in batches(3):
        ref = compiled(state, b)
        same_step(ref, graphed(state, b), n_weights)
        state = ref[0]
    assert graphed.captured == 1


@cuda
def test_graphed_step_keeps_earlier_states_and_recaptures_new_shapes():
    graphed = GraphedTrainStep(CFG)
    s0 = cuda_state()
    first, second = batches(2)
    s1, _ = graphed(s0, first)
    kept = to_device(s1, "cpu")
    s2, _ = graphed(s1, second)
    assert differing_elements(to_device(s1, "cpu"), kept) == {}, "a replay overwrote a returned state"
    assert int(s2.step) == int(s1.step) + 1 == int(s0.step) + 2
    graphed(s2, batches(1, batch=1, context=16)[0])
    assert graphed.captured == 2


@cuda
def test_a_returned_state_skips_the_copy_in_unless_written_or_stale():
    """A call on the state the last call returned copies only its batch in (the graph wrote that state into its
    own input); an in-place write to such a state, or an older state, takes the full copy. Each result is the
    compiled step's."""
    compiled = CompiledTrainStep(CFG)
    graphed = GraphedTrainStep(CFG, compiled)
    n_weights = sum(w.num_weights for w in weights(cuda_state().params))
    b1, b2, b3 = batches(3)
    s1, _ = graphed(cuda_state(), b1)
    captured = next(iter(graphed._graphs.values()))
    assert captured.resident
    copies = []
    gather = captured.state_in.layout.gather
    captured.state_in.layout.gather = lambda *a, **k: copies.append(1) or gather(*a, **k)

    ref = compiled(s1, b2)
    s2 = graphed(s1, b2)
    same_step(ref, s2, n_weights)
    assert copies == [], "the returned state was copied in again"
    same_step(compiled(s1, b3), graphed(s1, b3), n_weights)  # s1 is older than the last returned state
    assert copies == [1]
    s3 = graphed(s2[0], b3)[0]
    w = weights(s3.params)[0]
    w.packed[0, 0] = (w.packed[0, 0] + 1) % 243  # written in place after it was returned
    same_step(compiled(s3, b1), graphed(s3, b1), n_weights)
    assert copies == [1, 1, 1]
    s4 = graphed(s3, b2)[0]  # s3 is older than the last returned state
    assert copies == [1, 1, 1, 1]
    block = s4.params["blocks"][0]
    name = next(k for k, v in block.items() if isinstance(v, TernaryWeight))
    block[name] = dataclasses.replace(block[name], exp=block[name].exp - 1)  # a weight swapped in its dict
    same_step(compiled(s4, b3), graphed(s4, b3), n_weights)
    assert copies == [1, 1, 1, 1, 1]


def test_flat_tensors_round_trip_every_dtype_and_shape():
    """The graph's flat input/output layout: every tensor back bit for bit, as views of one buffer per dtype."""
    from arbfn.graphed import FlatTensors

    tensors = [torch.tensor(7, dtype=torch.int64), torch.randint(0, 255, (3, 5), dtype=torch.uint8),
               torch.randn(4, 6).t(), torch.tensor([True, False, True]), torch.zeros(0, 3, dtype=torch.int16),
               torch.randint(-128, 127, (2, 3, 2), dtype=torch.int8), torch.randn(5, dtype=torch.float64),
               torch.randint(0, 255, (7,), dtype=torch.uint8), torch.tensor(-3, dtype=torch.int64)]
    layout = FlatTensors(tensors)
    flats = layout.gather(tensors)
    assert [f.dtype for f in flats] == list(dict.fromkeys(t.dtype for t in tensors))  # one buffer per dtype
    back = layout.views(flats)
    for b in back:  # every tensor starts 16-byte aligned in its buffer (the compiled step copies misaligned inputs)
        assert (b.data_ptr() - flats[[f.dtype for f in flats].index(b.dtype)].data_ptr()) % 16 == 0
    sizes = {f.dtype: f.numel() for f in flats}  # padding only between tensors, to the next 16 bytes
    assert sizes[torch.int64] == 2 + 1 and sizes[torch.uint8] == 16 + 7 and sizes[torch.bool] == 3
    assert all(b.dtype == t.dtype and b.shape == t.shape and torch.equal(b, t) for b, t in zip(back, tensors))
    kept = [t.clone() for t in tensors]
    for f in flats:
        f.zero_()
    assert all(torch.equal(t, k) for t, k in zip(tensors, kept)), "a buffer aliases its tensors (one per dtype)"
    assert not any(b.any() for b in back)
    moved = [t + 1 if t.dtype != torch.bool else ~t for t in tensors]
    assert layout.gather(moved, out=flats) is flats  # in place, as each call writes the graph's inputs
    assert all(torch.equal(b, m) for b, m in zip(back, moved))
    with pytest.raises(ValueError, match="differ from the layout"):
        layout.gather(tensors[:-1] + [torch.zeros(5, dtype=torch.float32)])
    with pytest.raises(ValueError, match="differ from the layout"):
        layout.gather(tensors[:1] + [tensors[1].reshape(5, 3)] + tensors[2:])  # same bytes, another shape


def test_the_returned_state_check_sees_every_change():
    """The no-flatten check of a returned State: the very object, its dicts and lists holding the same items, its
    tensors unwritten. Any swap, insertion, removal or in-place write fails it; a node type it cannot walk turns
    it off."""
    from arbfn.graphed import _FlatTree, _Returned, _tensors

    tree = _FlatTree(init_model(CFG, torch.Generator().manual_seed(0)))
    flats = tree.layout.gather(_tensors(tree.leaves))
    state, tensors = tree.tree(flats)  # as a replay returns it: every tensor a view of a flat buffer
    returned = _Returned(None, state, tensors, flats)
    assert returned.is_this(state)
    assert not returned.is_this(State(state.params, state.step, state.config))  # the same parts, another State
    block = state.params["blocks"][0]
    name = next(k for k, v in block.items() if isinstance(v, TernaryWeight))
    kept = block[name]
    block[name] = dataclasses.replace(kept)
    assert not returned.is_this(state)
    block[name] = kept
    assert returned.is_this(state)
    block["extra"] = None
    assert not returned.is_this(state)
    del block["extra"]
    assert returned.is_this(state)
    blocks = state.params["blocks"]
    blocks.append(blocks.pop())  # the same items, the same order
    assert returned.is_this(state)
    blocks.reverse()
    assert not returned.is_this(state) or len(blocks) == 1
    blocks.reverse()
    kept.exp.add_(0)  # an in-place write, even one that changes no value: its buffer's counter moves
    assert not returned.is_this(state)
    again = _Returned(None, state, tensors, flats)
    assert again.is_this(state)
    tensors[-1].detach().mul_(1)  # a write through another view of the same buffer
    assert not again.is_this(state)
    odd = State({"x": {1, 2}}, state.step, state.config)  # a set: not a node the check walks
    assert not _Returned(None, odd, [state.step], [state.step]).is_this(odd)
