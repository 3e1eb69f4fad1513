"""MoE layer (arbfn/layers/moe.py): routing, dense == sparse dispatch, a float64 oracle of the mixture,
the ACT loop (eager == fixed), gradients to router / selected experts / halt probe, params and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from arbfn.layers.moe import init_moe, moe, moe_act, moe_act_step
from arbfn.loops import act_eager
from arbfn.ternary import attach_probes, decode, is_ternary, make_probes

D, FF, E, GS = 12, 20, 8, 4


def params(seed: int = 0, n_experts: int = E, d: int = D):
    return init_moe(d, FF, n_experts, GS, torch.Generator().manual_seed(seed))


def tokens(n: int, seed: int = 1, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def oracle(p, x: torch.Tensor, top_k: int) -> np.ndarray:
    """Float64 mixture from decoded weights: per token, softmax over its top-k logits, sum of those experts."""
    router = decode(p["router"]).double()
    experts = [(decode(ex["up"]).double(), decode(ex["down"]).double()) for ex in p["experts"]]
    xd = x.double()
    logits = xd @ router.T
    y = torch.zeros_like(xd)
    for n in range(x.shape[0]):
        top, ids = logits[n].topk(top_k)
        for weight, e in zip(torch.softmax(top, 0), ids.tolist()):
            up, down = experts[e]
            y[n] += weight * (F.gelu(xd[n] @ up.T) @ down.T)
    return y.numpy()


@settings(max_examples=15)
@given(n=st.sampled_from((1, 2, 3, 7, 13, 31)), top_k=st.integers(1, E), seed=st.integers(0, 2**16))
def test_dense_and_sparse_match_float64_oracle(n, top_k, seed):
    p, x = params(seed), tokens(n, seed + 1)
    yd, aux_d = moe(p, x, top_k, dense_limit=n)
    ys, aux_s = moe(p, x, top_k, dense_limit=n - 1)
    assert yd.shape == ys.shape == (n, D) and yd.dtype == ys.dtype == torch.float32
    torch.testing.assert_close(yd, ys, rtol=1e-5, atol=1e-6, msg="dense and sparse dispatch must agree")
    np.testing.assert_allclose(yd.double().numpy(), oracle(p, x, top_k), rtol=1e-4, atol=1e-5)
    assert torch.equal(aux_d["load"], aux_s["load"]) and aux_d["load"].dtype == torch.int64
    assert aux_d["load"].shape == (E,) and int(aux_d["load"].sum()) == n * top_k


def test_default_dense_limit_is_128(monkeypatch):
    import arbfn.layers.moe as moe_mod

    calls = []
    real = moe_mod.route_combine
    monkeypatch.setattr(moe_mod, "route_combine", lambda *a: calls.append(1) or real(*a))
    p = params()
    moe(p, tokens(128), 2)
    assert calls == [1], "128 tokens take the dense route-combine path"
    moe(p, tokens(129), 2)
    assert calls == [1], "129 tokens take the sparse path"


@settings(max_examples=12)
@given(shape=st.sampled_from(((1, D), (7, D), (2, 5, D), (1, 1, D), (3, 13, D))), dense_limit=st.sampled_from((0, 128)),
       seed=st.integers(0, 2**16))
def test_act_eager_equals_fixed(shape, dense_limit, seed):
    p = params(seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    out_e, aux_e = moe_act(p, x, 2, dense_limit=dense_limit)
    out_f, aux_f = moe_act(p, x, 2, fixed=True, dense_limit=dense_limit)
    assert out_e.shape == x.shape and aux_e["steps"].shape == shape[:-1] and aux_e["steps"].dtype == torch.int64
    assert torch.equal(out_e, out_f) and torch.equal(aux_e["ponder"], aux_f["ponder"])
    assert torch.equal(aux_e["steps"], aux_f["steps"])
    assert aux_e["ponder"].dim() == 0 and 1.0 <= float(aux_e["ponder"]) <= 5.0
    assert int(aux_e["steps"].min()) >= 1 and int(aux_e["steps"].max()) <= 4


def test_act_step_and_halting(monkeypatch):
    import arbfn.layers.moe as moe_mod

    p, x = params(5), tokens(9)
    x_next, ph = moe_act_step(p, x, 2)
    torch.testing.assert_close(x_next, x + moe(p, x, 2)[0])
    assert ph.shape == (9,) and bool(((ph > 0) & (ph < 1)).all())
    out, aux = moe_act(p, x, 2, max_steps=1)
    assert torch.equal(out, x_next) and bool((aux["steps"] == 1).all()), "one step: the output is that step's state"
    _, aux3 = moe_act(p, x, 2, max_steps=3, threshold=1e-6)
    assert bool((aux3["steps"] == 1).all()), "a tiny threshold halts every token at once"
    xb = tokens(40).reshape(5, 8, D)
    out4, aux4 = moe_act(p, xb, 2)
    ref = act_eager(lambda i, h: moe_act_step(p, h, 2), xb.reshape(40, D), 4, 0.99)
    assert torch.equal(out4, ref.output.reshape(5, 8, D)) and torch.equal(aux4["ponder"], ref.ponder.mean())
    assert torch.equal(aux4["steps"], ref.steps.reshape(5, 8)) and int(ref.steps.max()) == 4, "defaults 4 / 0.99"
    calls = []
    monkeypatch.setattr(moe_mod, "moe_act_step", lambda *a: calls.append(1) or moe_act_step(*a))
    moe_act(p, x, 2, max_steps=3, threshold=1e-6)
    moe_act(p, x, 2, max_steps=3, threshold=1e-6, fixed=True)
    assert len(calls) == 1 + 3, "eager stops once all tokens halted; fixed always runs max_steps"


@pytest.mark.parametrize("dense_limit", [0, 128])
def test_gradients_reach_router_selected_experts_and_halt(dense_limit):
    p, x = params(6), tokens(3, 7)
    probes = make_probes(p)

    def loss(pr):
        out, _ = moe_act(attach_probes(p, pr), x, 2, dense_limit=dense_limit)
        return out.square().sum()

    grads = torch.func.grad(loss)(probes)
    load = moe(p, x, 2)[1]["load"]
    assert float(grads["router"].abs().sum()) > 0 and float(grads["halt"].abs().sum()) > 0
    first_step_experts = (load > 0).nonzero().squeeze(1).tolist()
    for e in first_step_experts:
        for name in ("up", "down"):
            assert float(grads["experts"][e][name].abs().sum()) > 0, f"expert {e} {name} got no gradient"
    for leaf in pytree.tree_leaves(grads):
        assert bool(torch.isfinite(leaf).all())


def test_unselected_experts_get_zero_gradient():
    p, x = params(8), tokens(2, 9)
    load = moe(p, x, 1)[1]["load"]
    assert bool((load == 0).any()), "test data: 2 tokens with top-1 leave some expert unused"

    def loss(pr):
        return moe(attach_probes(p, pr), x, 1)[0].square().sum()

    grads = torch.func.grad(loss)(make_probes(p))
    for e in range(E):
        nonzero = float(grads["experts"][e]["up"].abs().sum()) > 0
        assert nonzero == bool(load[e] > 0), f"expert {e}: load {int(load[e])}, gradient nonzero {nonzero}"


def test_dense_path_compiles_fullgraph():
    p, x = params(10), tokens(5)
    eager, aux = moe(p, x, 2)
    compiled, aux_c = torch.compile(lambda t: moe(p, t, 2), fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(aux_c["load"], aux["load"])


def test_params_tree_integer_only_deterministic_and_meta():
    p, q = params(11), params(11)
    assert set(p) == {"router", "experts", "halt"} and len(p["experts"]) == E
    assert p["router"].out_features == E and p["router"].in_features == D and p["halt"].out_features == 1
    assert p["experts"][0]["up"].out_features == FF and p["experts"][0]["down"].in_features == FF
    leaves = [t for t in pytree.tree_leaves(p) if isinstance(t, torch.Tensor)]
    assert leaves and all(not (t.is_floating_point() or t.is_complex()) for t in leaves), "params must be integer"
    assert all(torch.equal(a, b) for a, b in zip(leaves, [t for t in pytree.tree_leaves(q) if t is not None]))
    assert not all(torch.equal(a.packed, b.packed) for a, b in zip(
        pytree.tree_leaves(p, is_leaf=is_ternary), pytree.tree_leaves(params(12), is_leaf=is_ternary)))
    meta = init_moe(D, FF, E, GS, None)
    assert all(t.device.type == "meta" for t in pytree.tree_leaves(meta) if isinstance(t, torch.Tensor))
    assert [t.shape for t in pytree.tree_leaves(meta) if t is not None] == [t.shape for t in leaves]


def test_bad_inputs_raise():
    p, x = params(), tokens(4)
    with pytest.raises(ValueError, match="top_k"):
        moe(p, x, E + 1)
    with pytest.raises(ValueError, match="top_k"):
        moe_act(p, x, 0)
    with pytest.raises(ValueError, match="shape"):
        moe(p, x[None], 2)
    with pytest.raises(ValueError, match="shape"):
        moe_act(p, x[0], 2)
    with pytest.raises(ValueError, match="shape"):
        moe(p, tokens(4, d=D + 1), 2)
    with pytest.raises(TypeError, match="float"):
        moe(p, x.long(), 2)
    with pytest.raises(ValueError, match="experts"):
        moe({**p, "experts": p["experts"][:-1]}, x, 2)
    with pytest.raises(ValueError, match="n_experts"):
        init_moe(D, FF, 0, GS, None)
