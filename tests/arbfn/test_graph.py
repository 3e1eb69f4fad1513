"""Graph layer (arbfn/layers/graph.py): init, the ACT hop loop, gradients to every weight, and the
Hebbian edge-score counters."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn.layers.graph import INIT_SCORE, graph, graph_hop_step, init_graph, update_graph_counters
from arbfn.ternary import TernaryWeight, attach_probes, linear, make_probes, weights
from kernels.graph import edge_aggregate_reference

V, D_NODE, D_MODEL, EPN, GS = 13, 8, 12, 3, 4


def make(seed: int = 0) -> dict:
    return init_graph(V, D_NODE, D_MODEL, EPN, GS, torch.Generator().manual_seed(seed))


def inputs(seed: int = 1, b: int = 2, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D_MODEL, generator=g), torch.randint(0, V, (b, t), generator=g)


def test_init_shapes_dtypes_and_edges():
    p = make()
    shapes = {"node_embed": (V, D_NODE), "msg": (D_NODE, D_NODE), "halt": (1, D_NODE), "out": (D_MODEL, D_NODE)}
    for k, s in shapes.items():
        assert isinstance(p[k], TernaryWeight) and (p[k].out_features, p[k].in_features) == s
    e = V * EPN
    for k, dt in (("src", torch.int32), ("dst", torch.int32), ("attr", torch.int8), ("score", torch.int8)):
        assert p[k].dtype == dt and p[k].shape == (e,)
    assert torch.equal(p["src"], torch.arange(V, dtype=torch.int32).repeat_interleave(EPN))
    assert int(p["dst"].min()) >= 0 and int(p["dst"].max()) < V and len(p["dst"].unique()) > 1
    assert set(p["attr"].tolist()) == {-1, 0, 1}
    assert bool((p["score"] == INIT_SCORE).all()) and 0 < INIT_SCORE < 127


def test_no_float_tensor_in_params_and_meta_init():
    for tree in (make(), init_graph(V, D_NODE, D_MODEL, EPN, GS, None)):
        leaves = [x for x in pytree.tree_leaves(tree) if x is not None]
        assert leaves and all(isinstance(x, torch.Tensor) for x in leaves) and all(not (x.is_floating_point() or x.is_complex()) for x in leaves)
    meta = init_graph(V, D_NODE, D_MODEL, EPN, GS, None)
    assert all(x.device.type == "meta" for x in pytree.tree_leaves(meta) if isinstance(x, torch.Tensor))
    real = make()
    sig = lambda tree: [None if t is None else (t.shape, t.dtype) for t in pytree.tree_leaves(tree)]  # noqa: E731
    assert sig(meta) == sig(real)


def test_deterministic_for_a_fixed_generator():
    a, b, c = make(5), make(5), make(6)
    pairs = list(zip(pytree.tree_leaves(a), pytree.tree_leaves(b)))
    assert all(x is None and y is None or torch.equal(x, y) for x, y in pairs)
    assert not torch.equal(a["dst"], c["dst"])
    x, idx = inputs()
    assert torch.equal(graph(a, x, idx, 3)[0], graph(b, x, idx, 3)[0])


def test_hop_step_formula():
    p = make()
    h = torch.randn(V, D_NODE, generator=torch.Generator().manual_seed(2))
    h_next, p_halt = graph_hop_step(p, h)
    want = h + torch.nn.functional.gelu(linear(p["msg"], edge_aggregate_reference(h, p["src"], p["dst"], p["attr"],
                                                                                  p["score"])))
    torch.testing.assert_close(h_next, want)
    torch.testing.assert_close(p_halt, torch.sigmoid(linear(p["halt"], want))[:, 0])
    assert p_halt.shape == (V,)


@pytest.mark.parametrize("max_hops,threshold", [(1, 0.99), (3, 0.99), (4, 0.5), (6, 1.0)])
def test_graph_shapes_and_eager_equals_fixed(max_hops, threshold):
    p = make()
    x, idx = inputs()
    out_e, aux_e = graph(p, x, idx, max_hops, threshold)
    out_f, aux_f = graph(p, x, idx, max_hops, threshold, fixed=True)
    assert out_e.shape == x.shape and out_e.dtype == x.dtype
    assert aux_e["ponder"].shape == () and aux_e["hops"].shape == (V,)
    assert int(aux_e["hops"].min()) >= 1 and int(aux_e["hops"].max()) <= max_hops
    torch.testing.assert_close(out_e, out_f, rtol=0, atol=0)
    torch.testing.assert_close(aux_e["ponder"], aux_f["ponder"], rtol=0, atol=0)
    assert torch.equal(aux_e["hops"], aux_f["hops"])


def test_graph_adds_projected_node_state_of_each_index():
    p = make()
    x, idx = inputs(b=3, t=4)
    out, _ = graph(p, x, idx, 2)
    nodes_all = graph(p, torch.zeros(1, V, D_MODEL), torch.arange(V)[None], 2)[0][0]  # out(nodes) for every node
    torch.testing.assert_close(out, x + nodes_all[idx], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, x)


def test_gradients_reach_every_probe():
    p = make()
    x, idx = inputs()
    idx[0, 0] = 0  # a known gathered node

    names = ["node_embed", "msg", "halt", "out"]
    assert len(weights(p)) == len(names), "every ternary weight of the tree is probed"

    def loss(probes):
        q = {**p, **{k: attach_probes(p[k], probes[k]) for k in names}}
        return graph(q, x, idx, 3)[0].square().sum()

    grads = torch.func.grad(loss)({k: make_probes(p[k]) for k in names})
    for k in names:
        assert grads[k].shape == (p[k].out_features, p[k].in_features)
        assert bool(grads[k].abs().sum() > 0), f"no gradient reaches {k}"


def test_graph_under_compile_matches_eager():
    p = make()
    x, idx = inputs()
    eager = graph(p, x, idx, 2, fixed=True)[0]
    compiled = torch.compile(lambda x, i: graph(p, x, i, 2, fixed=True)[0], fullgraph=True)(x, idx)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_counters_hand_example_and_purity():
    p = make()
    src = torch.tensor([0, 0, 0, 1, 1, 2, 3], dtype=torch.int32)
    dst = torch.tensor([1, 2, 2, 0, 3, 3, 0], dtype=torch.int32)
    score = torch.tensor([10, 10, 10, 10, 10, 10, 10], dtype=torch.int8)
    q = {**p, "src": src, "dst": dst, "attr": torch.ones(7, dtype=torch.int8), "score": score}
    # transitions: 0->2, 2->0, 0->2 again (counts once), 2->5, 5->6 (5 has no edges); row 2: 1->3, 3->3
    idx = torch.tensor([[0, 2, 0, 2, 5, 6], [1, 3, 3, 3, 3, 3]])
    new = update_graph_counters(q, idx)
    # 0->1: src 0 seen, not hit: -1; 0->2 (twice in the list): +1 each; 1->0: -1; 1->3: +1;
    # 2->3: src 2 seen (2->0), not hit: -1; 3->0: 3 seen (3->3), not hit: -1
    assert new["score"].tolist() == [9, 11, 11, 9, 11, 9, 9]
    assert new["score"].dtype == torch.int8
    assert torch.equal(q["score"], score), "the update must not mutate its input"
    assert new["src"] is q["src"] and new["msg"] is q["msg"]
    assert torch.equal(update_graph_counters(q, idx[:, :1])["score"], score), "one step has no transitions"


def test_counters_saturate():
    src, dst = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)
    q = {**make(), "src": src, "dst": dst, "score": torch.tensor([126, -127], dtype=torch.int8)}
    idx = torch.tensor([[0, 1]])
    for want in ([127, -128], [127, -128]):
        q = update_graph_counters(q, idx)
        assert q["score"].tolist() == want


def test_bad_inputs_raise():
    p = make()
    x, idx = inputs()
    with pytest.raises(ValueError, match="indices must be in"):
        graph(p, x, idx + V, 2)
    with pytest.raises(ValueError, match="indices must be in"):
        graph(p, x, idx - V, 2)
    with pytest.raises(TypeError, match="int64"):
        graph(p, x, idx.int(), 2)
    with pytest.raises(TypeError, match="shape"):
        graph(p, x, idx[:, :-1], 2)
    with pytest.raises(ValueError, match=r"x must be \[B, T"):
        graph(p, x[..., :-1], idx, 2)
    with pytest.raises(ValueError, match="max_steps"):
        graph(p, x, idx, 0)
    with pytest.raises(ValueError, match="indices must be in"):
        update_graph_counters(p, idx + V)
    with pytest.raises(TypeError, match=r"\[B, T\]"):
        update_graph_counters(p, idx[0])
    with pytest.raises(ValueError, match="positive"):
        init_graph(V, D_NODE, D_MODEL, 0, GS, None)


def test_membership_matches_isin():
    """The capture-safe membership test of update_graph_counters is torch.isin, empty pools included."""
    from arbfn.layers.graph import _member

    g = torch.Generator().manual_seed(0)
    for n_values, n_pool in ((0, 3), (5, 0), (1, 1), (40, 17), (17, 40)):
        values, pool = torch.randint(0, 30, (n_values,), generator=g), torch.randint(0, 30, (n_pool,), generator=g)
        assert torch.equal(_member(values, pool), torch.isin(values, pool))
