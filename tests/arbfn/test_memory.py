"""Tests of arbfn.layers.memory: MemGram, FocusGate, ConversationLSTM and their bundle, against float64 oracles."""

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from arbfn.layers.memory import (INT16_MAX, conversation_lstm, focus_gate, init_memory, memgram, memory,
                                 update_memgram_counters, update_memory_counters)
from arbfn.ternary import attach_probes, decode, is_ternary, make_probes, weights

D, SLOTS, H, GS = 13, 7, 6, 4  # primes / non-multiples of 5 and of the group size


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def params():
    return init_memory(D, SLOTS, H, GS, gen(0))


def xs(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, D, generator=gen(seed))


def dense(p) -> dict:
    """Every ternary weight of ``p`` as a float64 matrix (probes ignored), keyed like the params tree."""
    return pytree.tree_map(lambda w: decode(w, torch.float64) if is_ternary(w) else w, p, is_leaf=is_ternary)


def oracle_memory(w: dict, x: torch.Tensor, carry=None):
    """Independent float64 statement of the bundle: argmax slot read, focus gate, bias-free LSTM."""
    key, slots, gate_w = w["memgram"]["key"], w["memgram"]["slots"], w["focus"]["w"]
    scores = (x @ key.T) @ slots.T / D ** 0.5
    idx = scores.argmax(-1)
    read = slots[idx] * torch.softmax(scores, -1).gather(-1, idx[..., None])
    gated = x + torch.sigmoid(torch.cat([x, read], -1) @ gate_w.T) * read
    b = x.shape[0]
    h, c = carry if carry is not None else (x.new_zeros(b, H), x.new_zeros(b, H))
    ys = []
    for t in range(x.shape[1]):
        z = torch.cat([x[:, t], h], -1) @ w["lstm"]["gates"].T
        i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h @ w["lstm"]["out"].T)
    return gated + torch.stack(ys, 1), (h, c), idx


@pytest.mark.parametrize("b,t", [(1, 1), (2, 5), (3, 7)])
def test_shapes_dtypes_and_oracle(params, b, t):
    x = xs(b, t)
    out, (h, c), aux = memory(params, x)
    assert out.shape == (b, t, D) and out.dtype == torch.float32
    assert h.shape == c.shape == (b, H) and h.dtype == c.dtype == torch.float32
    idx = aux["slot_indices"]
    assert idx.shape == (b, t) and idx.dtype == torch.int64
    want, (wh, wc), widx = oracle_memory(dense(params), x.double())
    assert torch.equal(idx, widx)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), wh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.double(), wc, atol=1e-5, rtol=1e-5)


def test_parts_shapes_and_gate_range(params):
    x = xs(2, 4)
    read, aux = memgram(params["memgram"], x)
    assert read.shape == x.shape and aux["slot_indices"].shape == (2, 4)
    gated = focus_gate(params["focus"], x, read)
    gate = ((gated - x) * read).sum(-1, keepdim=True) / (read * read).sum(-1, keepdim=True)  # least squares
    torch.testing.assert_close(gated, x + gate * read)
    assert bool(((gate > 0) & (gate < 1)).all())
    y, _ = conversation_lstm(params["lstm"], x)
    assert y.shape == x.shape
    empty, carry = conversation_lstm(params["lstm"], x[:, :0])
    assert empty.shape == (2, 0, D) and torch.equal(carry[0], torch.zeros(2, H))


def test_reads_spread_over_slots(params):
    idx = memory(params, xs(4, 16))[2]["slot_indices"]
    assert idx.unique().numel() > 1


@pytest.mark.parametrize("fn", ["lstm", "memory"])
def test_causal(params, fn):
    run = (lambda x: conversation_lstm(params["lstm"], x)[0]) if fn == "lstm" else (lambda x: memory(params, x)[0])
    x = xs(2, 8)
    x2 = x.clone()
    x2[:, 5] += 1.0
    a, b = run(x), run(x2)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5]) and not torch.allclose(a[:, 7], b[:, 7])


@pytest.mark.parametrize("split", [1, 3, 6])
def test_carry_continues_across_segments(params, split):
    x = xs(2, 7)
    whole, (h, c), aux = memory(params, x)
    first, carry, aux1 = memory(params, x[:, :split])
    second, (h2, c2), aux2 = memory(params, x[:, split:], carry)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((h2, c2), (h, c), atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.cat([aux1["slot_indices"], aux2["slot_indices"]], 1), aux["slot_indices"])
    # and a non-zero carry changes the output: the state really flows
    assert not torch.allclose(memory(params, x[:, split:])[0], second)


def oracle_counters(strength: list[int], idx: list[int], decay_every: int, step: int) -> list[int]:
    decay = (step + 1) % decay_every == 0
    return [min(INT16_MAX, max(0, s - decay) + (i in idx)) for i, s in enumerate(strength)]


@settings(max_examples=60)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0, 1, 2, 5, INT16_MAX - 1, INT16_MAX]), min_size=n, max_size=n),
    st.lists(st.integers(0, n - 1), min_size=0, max_size=6))),
    st.integers(1, 4), st.integers(0, 12))
def test_counters_exact(case, decay_every, step):
    strength, idx = case
    p = {"strength": torch.tensor(strength, dtype=torch.int16)}
    before = p["strength"].clone()
    new = update_memgram_counters(p, {"slot_indices": torch.tensor(idx, dtype=torch.int64).view(-1, 1)},
                                  decay_every, torch.tensor(step))
    assert new["strength"].dtype == torch.int16
    assert new["strength"].tolist() == oracle_counters(strength, idx, decay_every, step)
    assert torch.equal(p["strength"], before)  # pure: the input is untouched


def test_counters_saturate_and_decay_over_time(params):
    aux = {"slot_indices": torch.tensor([[0, 0, 2]])}
    p = {**params["memgram"], "strength": torch.tensor([INT16_MAX] + [0] * (SLOTS - 1), dtype=torch.int16)}
    history = []
    for step in range(6):
        p = update_memgram_counters(p, aux if step < 2 else {"slot_indices": torch.zeros(0, dtype=torch.int64)},
                                    decay_every=3, step=torch.tensor(step, dtype=torch.int64))
        history.append(p["strength"][:3].tolist())
    assert history == [[INT16_MAX, 0, 1], [INT16_MAX, 0, 2], [INT16_MAX - 1, 0, 1],
                       [INT16_MAX - 1, 0, 1], [INT16_MAX - 1, 0, 1], [INT16_MAX - 2, 0, 0]]


def test_bundle_counters_follow_the_forward(params):
    x = xs(2, 5)
    _, _, aux = memory(params, x)
    new = update_memory_counters(params, aux, decay_every=4, step=0)
    touched = torch.zeros(SLOTS, dtype=torch.int16)
    touched[aux["slot_indices"].unique()] = 1
    assert torch.equal(new["memgram"]["strength"], touched)
    assert new["memgram"]["key"] is params["memgram"]["key"] and new["lstm"] is params["lstm"]
    assert int(params["memgram"]["strength"].abs().sum()) == 0


def test_gradients_reach_every_probe_and_match_the_oracle(params):
    x, target = xs(2, 6), xs(2, 6, seed=2)

    leaves, spec = pytree.tree_flatten(make_probes(params))
    live = [p for p in leaves if p is not None]

    def loss(live_probes):
        it = iter(live_probes)
        probes = pytree.tree_unflatten([None if p is None else next(it) for p in leaves], spec)
        return ((memory(attach_probes(params, probes), x)[0] - target) ** 2).sum()

    got = torch.func.grad(loss)(live)
    ws = dense(params)
    flat, spec = pytree.tree_flatten(ws)
    flat = [t.clone().requires_grad_() if t.dtype == torch.float64 else t for t in flat]
    out = oracle_memory(pytree.tree_unflatten(flat, spec), x.double())[0]
    ((out - target.double()) ** 2).sum().backward()
    want = [t.grad for t in flat if t.dtype == torch.float64]
    assert len(got) == len(want) == len(weights(params)) == 5
    for g, w in zip(got, want):
        assert bool(g.abs().sum() > 0)
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_params_hold_no_float_tensor(params):
    leaves = [t for t in pytree.tree_leaves(params) if isinstance(t, torch.Tensor)]
    assert leaves and all(not t.is_floating_point() and not t.is_complex() for t in leaves)
    assert params["memgram"]["strength"].dtype == torch.int16
    shapes = {k: (w.out_features, w.in_features) for k, w in
              [("key", params["memgram"]["key"]), ("slots", params["memgram"]["slots"]),
               ("focus", params["focus"]["w"]), ("gates", params["lstm"]["gates"]), ("out", params["lstm"]["out"])]}
    assert shapes == {"key": (D, D), "slots": (SLOTS, D), "focus": (1, 2 * D), "gates": (4 * H, D + H), "out": (D, H)}


def test_deterministic(params):
    again, other = init_memory(D, SLOTS, H, GS, gen(0)), init_memory(D, SLOTS, H, GS, gen(1))
    la, sa = pytree.tree_flatten(params)
    lb, sb = pytree.tree_flatten(again)
    assert sa == sb and all(torch.equal(a, b) for a, b in zip(la, lb) if isinstance(a, torch.Tensor))
    assert not all(torch.equal(a, b) for a, b in zip(la, pytree.tree_leaves(other)) if isinstance(a, torch.Tensor))
    x = xs(2, 4)
    a, b = memory(params, x), memory(again, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[2]["slot_indices"],
                                                                                   b[2]["slot_indices"])


def test_meta_init_matches_real(params):
    meta = init_memory(D, SLOTS, H, GS, None)
    lm, sm = pytree.tree_flatten(meta)
    lr, sr = pytree.tree_flatten(params)
    assert sm == sr
    for m, r in zip(lm, lr):
        if isinstance(r, torch.Tensor):
            assert m.device.type == "meta" and m.shape == r.shape and m.dtype == r.dtype


def test_errors(params):
    x = xs(2, 3)
    with pytest.raises(ValueError, match=r"\[B, T, 13\]"):
        memgram(params["memgram"], torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match=r"\[B, T"):
        memory(params, torch.randn(3, D))
    with pytest.raises(TypeError, match="float"):
        memory(params, torch.ones(2, 3, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="read must match"):
        focus_gate(params["focus"], x, x[:1])
    with pytest.raises(ValueError, match="carry h"):
        conversation_lstm(params["lstm"], x, (torch.zeros(2, H + 1), torch.zeros(2, H)))
    with pytest.raises(TypeError, match="tuple"):
        conversation_lstm(params["lstm"], x, [torch.zeros(2, H)] * 2)
    aux = {"slot_indices": torch.tensor([[0, 1]])}
    with pytest.raises(ValueError, match="decay_every"):
        update_memgram_counters(params["memgram"], aux, 0, 0)
    with pytest.raises(TypeError, match="step"):
        update_memgram_counters(params["memgram"], aux, 2, torch.tensor(1.0))
    with pytest.raises(ValueError, match="slot_indices"):
        update_memgram_counters(params["memgram"], {"slot_indices": torch.tensor([SLOTS])}, 2, 0)
    with pytest.raises(TypeError, match="slot_indices"):
        update_memgram_counters(params["memgram"], {"slot_indices": torch.tensor([0.0])}, 2, 0)
    with pytest.raises(ValueError, match="group_size"):
        init_memory(D, SLOTS, H, 1, gen(0))
