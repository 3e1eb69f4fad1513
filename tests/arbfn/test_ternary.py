"""Tests of arbfn.ternary: the packed ternary weight as a pytree node, its init, validation, ops and update."""

import dataclasses
import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from arbfn.ternary import (
    dither_flip_counters,
    flip_counter_bits,
    TernaryWeight,
    attach_probes,
    decode,
    embed,
    init_exponent,
    init_ternary,
    is_ternary,
    linear,
    make_probes,
    map_weights,
    set_flip_counters,
    update_weight,
    update_weights,
    validate_weight,
    weights,
    weights_with_grads,
)
from kernels import update as update_ops
from kernels.packing import pack_reference, unpack_reference
from kernels.update import pack_nibbles, unpack_nibbles

FIELDS = ("packed", "exp", "t_accum", "e_accum")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def trits_of(w: TernaryWeight) -> torch.Tensor:
    return unpack_reference(w.packed, w.in_features)


def assert_same_weight(a: TernaryWeight, b: TernaryWeight) -> None:
    assert (a.in_features, a.group_size) == (b.in_features, b.group_size)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("n,k,gs", [(1, 1, 4), (3, 7, 4), (8, 64, 32), (5, 97, 32), (2, 33, 96), (297, 64, 32)])
def test_init_shapes_and_dtypes(n, k, gs):
    w = init_ternary(n, k, gs, gen())
    assert w.packed.dtype == torch.uint8 and w.packed.shape == (n, math.ceil(k / 5))
    assert w.exp.dtype == torch.int8 and w.exp.shape == (n, math.ceil(k / gs))
    assert w.t_accum.dtype == torch.int8 and w.t_accum.shape == (n, k)
    assert w.e_accum.dtype == torch.int8 and w.e_accum.shape == (n, math.ceil(k / gs))
    assert (w.in_features, w.group_size, w.out_features, w.num_weights) == (k, gs, n, n * k)
    assert w.probe is None and w.trainable
    assert not w.t_accum.any() and not w.e_accum.any(), "accumulators start at zero"
    validate_weight(w)


def test_init_about_a_third_zero_trits_and_balanced_signs():
    t = trits_of(init_ternary(256, 320, 32, gen(1))).to(torch.float32)
    n = t.numel()
    zero, plus, minus = (t == 0).sum() / n, (t == 1).sum() / n, (t == -1).sum() / n
    assert abs(float(zero) - 1 / 3) < 0.01
    assert abs(float(plus) - 1 / 3) < 0.01 and abs(float(minus) - 1 / 3) < 0.01
    half = trits_of(init_ternary(256, 320, 32, gen(1), zero_fraction=0.5))
    assert abs(float((half == 0).float().mean()) - 0.5) < 0.01


def test_init_fan_in_exponent():
    # 2**E ~ 1/sqrt((2/3) K) (a third of the trits are zero): K=40 -> 1/5.2 -> -2 (1/sqrt(K) alone would give -3);
    # K=64 -> 1/6.5 -> -3; K=1000 -> 1/25.8 -> -5; K=1 -> 0 (fan-in clamped to 1)
    assert (init_exponent(40), init_exponent(64), init_exponent(1000), init_exponent(1)) == (-2, -3, -5, 0)
    for k in (1, 5, 64, 256, 1000):
        w = init_ternary(4, k, 32, gen())
        assert torch.equal(w.exp, torch.full_like(w.exp, init_exponent(k)))
    w = init_ternary(4, 64, 32, gen(), exponent=2)
    assert bool((w.exp == 2).all())
    # the scale makes outputs of about unit std for unit-variance inputs
    w = init_ternary(512, 1024, 32, gen(2))
    y = linear(w, torch.randn(64, 1024, generator=gen(3)))
    assert 0.6 < float(y.std()) < 1.6


def test_init_constant_trits():
    w = init_ternary(1, 13, 4, gen(), exponent=0, trits=1)
    assert torch.equal(decode(w), torch.ones(1, 13))
    validate_weight(w)


def test_init_generator_none_is_shape_only_meta():
    w = init_ternary(300, 1000, 32, None)
    for f in FIELDS:
        assert getattr(w, f).device.type == "meta", f
    ref = init_ternary(300, 1000, 32, gen())
    for f in FIELDS:
        assert getattr(w, f).shape == getattr(ref, f).shape and getattr(w, f).dtype == getattr(ref, f).dtype


def test_init_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive sizes"):
        init_ternary(0, 4, 32, gen())
    with pytest.raises(ValueError, match="positive sizes"):
        init_ternary(4, 0, 32, gen())
    with pytest.raises(ValueError, match="group_size"):
        init_ternary(4, 8, 3, gen())


def test_init_deterministic_for_a_seed():
    a, b, c = init_ternary(17, 53, 8, gen(5)), init_ternary(17, 53, 8, gen(5)), init_ternary(17, 53, 8, gen(6))
    assert_same_weight(a, b)
    assert not torch.equal(a.packed, c.packed)


SIZES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 11, 13, 31, 32, 33, 37, 64, 97, 101, 127, 131])


@settings(max_examples=60)
@given(n=SIZES, k=SIZES, gs=st.sampled_from([4, 5, 7, 32, 33, 96]), seed=st.integers(0, 2**31 - 1))
def test_init_property_over_sizes(n, k, gs, seed):
    w = init_ternary(n, k, gs, gen(seed))
    assert w.packed.shape == (n, -(-k // 5)) and w.exp.shape == (n, -(-k // gs))
    assert w.t_accum.shape == (n, k) and w.e_accum.shape == w.exp.shape
    validate_weight(w)  # bytes 0..242, zero padding trits, dtypes and shapes
    t = trits_of(w)
    assert bool(((t >= -1) & (t <= 1)).all())
    assert torch.equal(pack_reference(t), w.packed), "packing round trip"
    assert bool((w.exp == init_exponent(k)).all())
    assert_same_weight(w, init_ternary(n, k, gs, gen(seed)))


# ---------------------------------------------------------------- validation


@pytest.fixture
def w7() -> TernaryWeight:
    return init_ternary(3, 7, 4, gen())


@pytest.mark.parametrize("byte", range(243, 256))
def test_validate_rejects_invalid_packed_bytes(byte):
    w = init_ternary(3, 10, 4, gen())  # k a multiple of 5: no padding, only the byte range can fail
    packed = w.packed.clone()
    packed[1, 1] = byte
    with pytest.raises(ValueError, match=rf"mine: .*invalid byte.*\[1, 1\] = {byte}"):
        validate_weight(dataclasses.replace(w, packed=packed), "mine")


def test_validate_accepts_242_and_rejects_nonzero_padding(w7):
    w = init_ternary(3, 10, 4, gen())
    packed = w.packed.clone()
    packed[0, 0] = 242
    validate_weight(dataclasses.replace(w, packed=packed))
    packed = w7.packed.clone()
    packed[0, 1] = 0  # k=7: the last byte's trits 2..4 are padding; digit 0 there is a -1 trit
    with pytest.raises(ValueError, match="pad"):
        validate_weight(dataclasses.replace(w7, packed=packed))


@pytest.mark.parametrize(
    "field,bad,match",
    [
        ("packed", lambda w: w.packed.to(torch.int8), "uint8"),
        ("packed", lambda w: w.packed[:, :1], "bytes"),
        ("packed", lambda w: w.packed[0], "2-D"),
        ("exp", lambda w: w.exp.to(torch.int16), "exp must be"),
        ("exp", lambda w: w.exp[:, :1], "exp must be"),
        ("exp", lambda w: None, "exp must be .*missing"),
        ("t_accum", lambda w: w.t_accum.to(torch.int32), "t_accum must be"),
        ("t_accum", lambda w: w.t_accum[:, :5], "t_accum must be"),
        ("t_accum", lambda w: w.t_accum.float(), "t_accum must be"),
        ("e_accum", lambda w: w.e_accum.to(torch.uint8), "e_accum must be"),
        ("e_accum", lambda w: None, "e_accum must be .*missing"),
        ("e_accum", lambda w: torch.zeros(2, 2, dtype=torch.int8), "e_accum must be"),
    ],
)
def test_validate_rejects_wrong_dtypes_and_shapes(w7, field, bad, match):
    with pytest.raises(ValueError, match=match):
        validate_weight(dataclasses.replace(w7, **{field: bad(w7)}))


def test_validate_rejects_persistent_probe_and_accepts_inference_weight(w7):
    with pytest.raises(ValueError, match="probe"):
        validate_weight(dataclasses.replace(w7, probe=torch.zeros(3, 7)))
    validate_weight(dataclasses.replace(w7, t_accum=None, e_accum=None))  # inference-only: no accumulators
    assert not dataclasses.replace(w7, t_accum=None, e_accum=None).trainable
    validate_weight(dataclasses.replace(w7, t_accum=None))  # stochastic flips: trainable without t_accum
    assert dataclasses.replace(w7, t_accum=None).trainable


# ---------------------------------------------------------------- pytree


def test_pytree_round_trip_keeps_static_fields():
    w = init_ternary(6, 37, 8, gen())
    leaves, spec = pytree.tree_flatten(w)
    tensors = [x for x in leaves if x is not None]
    assert len(tensors) == 4 and all(isinstance(t, torch.Tensor) for t in tensors)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, TernaryWeight)
    assert_same_weight(back, w)
    # static fields are context, not leaves: a tree_map over tensors keeps them
    mapped = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, {"w": [w]})
    assert isinstance(mapped["w"][0], TernaryWeight)
    assert (mapped["w"][0].in_features, mapped["w"][0].group_size) == (37, 8)
    assert_same_weight(mapped["w"][0], w)
    names = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(w)[0]]
    assert names == [".packed", ".exp", ".t_accum", ".e_accum", ".probe"]


def test_weights_and_map_weights_walk_nested_trees():
    tree = {"a": init_ternary(2, 5, 4, gen()), "b": [init_ternary(3, 6, 4, gen()), {"c": init_ternary(1, 9, 4, gen())}]}
    assert [w.in_features for w in weights(tree)] == [5, 6, 9]
    doubled = map_weights(lambda w: dataclasses.replace(w, exp=w.exp + 1), tree)
    assert all(bool((x.exp == y.exp + 1).all()) for x, y in zip(weights(doubled), weights(tree)))
    assert is_ternary(tree["a"]) and not is_ternary(tree["a"].packed)


# ---------------------------------------------------------------- probes


def test_make_probes_are_zero_stride_zeros():
    frozen = dataclasses.replace(init_ternary(2, 8, 4, gen()), t_accum=None, e_accum=None)
    tree = {"a": init_ternary(4, 13, 4, gen()), "b": [init_ternary(3, 6, 4, gen())], "frozen": frozen}
    probes = make_probes(tree)
    for p, w in ((probes["a"], tree["a"]), (probes["b"][0], tree["b"][0])):
        assert p.shape == (w.out_features, w.in_features) and p.dtype == torch.float32
        assert p.stride() == (0, 0), "a probe must cost no memory"
        assert not p.any()
    assert probes["frozen"] is None, "untrainable weights get no probe"
    assert make_probes(tree, torch.float64)["a"].dtype == torch.float64


def test_attach_probes_sets_each_weight_probe():
    tree = {"a": init_ternary(4, 13, 4, gen()), "b": [init_ternary(3, 6, 4, gen())]}
    probes = make_probes(tree)
    attached = attach_probes(tree, probes)
    assert attached["a"].probe is probes["a"] and attached["b"][0].probe is probes["b"][0]
    assert tree["a"].probe is None, "attach_probes must not modify its input"
    assert_same_weight(attached["a"], tree["a"])
    detached = attach_probes(attached, pytree.tree_map(lambda _: None, probes))
    assert detached["a"].probe is None


def test_weights_with_grads_pairs_each_weight_with_its_gradient_and_rebuilds_the_tree():
    frozen = dataclasses.replace(init_ternary(2, 8, 4, gen()), t_accum=None, e_accum=None)
    tree = {"a": init_ternary(4, 13, 4, gen()), "b": [init_ternary(3, 6, 4, gen(1))], "frozen": frozen, "n": 7}
    grads = make_probes(tree)
    ws, gs, rebuild = weights_with_grads(tree, grads)
    assert all(a is b for a, b in zip(ws, weights(tree), strict=True))
    assert [g is None for g in gs] == [False, False, True]
    assert gs[0] is grads["a"] and gs[1] is grads["b"][0]
    swapped = rebuild([ws[1], ws[0], ws[2]])
    assert swapped["a"] is ws[1] and swapped["b"][0] is ws[0] and swapped["frozen"] is frozen and swapped["n"] == 7
    assert tree["a"] is ws[0], "rebuild must not modify its input"


# ---------------------------------------------------------------- ops


@pytest.mark.parametrize("n,k,gs", [(1, 1, 4), (7, 13, 4), (16, 64, 32), (9, 101, 33)])
def test_linear_equals_dense_matmul(n, k, gs):
    w = init_ternary(n, k, gs, gen(n * k))
    w = dataclasses.replace(w, exp=torch.randint(-4, 3, w.exp.shape, generator=gen(1), dtype=torch.int8))
    x = torch.randn(2, 5, k, generator=gen(2))
    dense = decode(w)
    assert dense.shape == (n, k)
    expected = x @ dense.T
    assert torch.allclose(linear(w, x), expected, rtol=1e-5, atol=1e-5)
    # decode is T * 2**E with the group's exponent
    cols = torch.arange(k)
    assert torch.equal(dense, trits_of(w).float() * torch.exp2(w.exp.float()[:, cols // gs]))


def test_linear_rejects_wrong_feature_size():
    w = init_ternary(4, 13, 4, gen())
    with pytest.raises(ValueError, match="13 features.*12"):
        linear(w, torch.randn(2, 12))


def test_linear_probe_gradient_is_dL_dW():
    w = init_ternary(6, 11, 4, gen())
    x, g = torch.randn(3, 11, generator=gen(1)), torch.randn(3, 6, generator=gen(2))
    probe = make_probes({"w": w})["w"]
    grad = torch.func.grad(lambda p: (linear(dataclasses.replace(w, probe=p), x) * g).sum())(probe)
    assert torch.allclose(grad, g.T @ x, rtol=1e-5, atol=1e-5)


def test_embed_gathers_decoded_rows():
    w = init_ternary(297, 24, 8, gen(3), exponent=0)
    w = dataclasses.replace(w, exp=torch.randint(-2, 2, w.exp.shape, generator=gen(1), dtype=torch.int8))
    ids = torch.tensor([[0, 5, 296], [17, 17, 100]])
    out = embed(w, ids)
    assert out.shape == (2, 3, 24) and out.dtype == torch.float32
    assert torch.equal(out, decode(w)[ids])


# ---------------------------------------------------------------- update


def test_update_zero_grad_changes_nothing():
    w = init_ternary(9, 23, 4, gen())
    # give the accumulators non-zero values inside their ranges first
    w = dataclasses.replace(w, t_accum=torch.randint(-7, 8, w.t_accum.shape, generator=gen(1), dtype=torch.int8),
                            e_accum=torch.randint(-31, 32, w.e_accum.shape, generator=gen(2), dtype=torch.int8))
    new, flips, moves = update_weight(w, torch.zeros(9, 23), 8, 32)
    assert_same_weight(new, w)
    assert int(flips) == 0 and int(moves) == 0
    same, flips, moves = update_weight(w, None, 8, 32)
    assert same is w and int(flips) == 0 and int(moves) == 0


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x).to(torch.int32)


def test_update_threshold_one_moves_every_trit_and_exponent_by_the_rule():
    n, k, gs = 5, 17, 4
    w = init_ternary(n, k, gs, gen(7))
    grad = torch.randn(n, k, generator=gen(8))
    grad[0, :3] = 0.0  # zero gradient: no vote
    t, s = trits_of(w).to(torch.int32), _sign(grad)
    new, flips, moves = update_weight(w, grad, 1, 1)
    # threshold 1: every vote moves its trit one step against the gradient sign, clamped to {-1, 0, 1}
    expect_t = (t - s).clamp(-1, 1)
    assert torch.equal(trits_of(new).to(torch.int32), expect_t)
    moved = expect_t != t
    assert torch.equal(new.t_accum.to(torch.int32), torch.where(moved, 0, -s))
    # exponent: per group, vote -sign(sum(sign(grad) * old trit)); threshold 1 moves it at once
    score = torch.nn.functional.pad(s * t, (0, 20 - k)).view(n, 5, gs).sum(-1)
    assert torch.equal(new.exp.to(torch.int32), w.exp.to(torch.int32) - _sign(score))
    assert not new.e_accum.any()
    assert int(flips) == int(moved.sum()) > 0 and int(moves) == int((score != 0).sum()) > 0
    validate_weight(new)
    # the input weight is untouched (pure)
    assert_same_weight(w, init_ternary(n, k, gs, gen(7)))


def test_update_below_threshold_only_accumulates():
    n, k, gs = 4, 12, 4
    w = init_ternary(n, k, gs, gen(9))
    grad = torch.randn(n, k, generator=gen(10))
    s, t = _sign(grad), trits_of(w).to(torch.int32)
    new, flips, moves = update_weight(w, grad, 8, 32)
    assert torch.equal(new.packed, w.packed) and torch.equal(new.exp, w.exp)
    assert torch.equal(new.t_accum.to(torch.int32), -s)
    score = (s * t).view(n, 3, gs).sum(-1)
    assert torch.equal(new.e_accum.to(torch.int32), -_sign(score))
    assert int(flips) == 0 and int(moves) == 0
    # repeated votes of one sign saturate at the threshold and flip exactly when it is reached
    state = w
    for step in range(1, 4):
        state, flips, _ = update_weight(state, -torch.ones(n, k), 3, 127)
        if step < 3:
            assert torch.equal(state.packed, w.packed) and bool((state.t_accum == step).all())
    moved = t < 1
    assert int(flips) == int(moved.sum())
    assert torch.equal(trits_of(state).to(torch.int32), (t + 1).clamp(max=1))
    assert torch.equal(state.t_accum.to(torch.int32), torch.where(moved, 0, 3))


# ---------------------------------------------------------------- stochastic flips and the counter layout


def test_set_flip_counters_drops_and_adds_zero_counters():
    frozen = dataclasses.replace(init_ternary(2, 8, 4, gen()), t_accum=None, e_accum=None)
    tree = {"a": init_ternary(4, 13, 4, gen(1)), "b": [init_ternary(3, 6, 4, gen(2))], "frozen": frozen}
    tree["a"] = dataclasses.replace(tree["a"], t_accum=torch.full((4, 13), 5, dtype=torch.int8))
    dropped = set_flip_counters(tree, False)
    assert all(w.t_accum is None for w in weights(dropped)) and dropped["frozen"] is frozen
    assert all(w.trainable for w in (dropped["a"], dropped["b"][0]))
    assert tree["a"].t_accum is not None, "set_flip_counters must not modify its input"
    added = set_flip_counters(dropped, True)
    assert added["frozen"] is frozen and not added["frozen"].trainable
    for w in (added["a"], added["b"][0]):
        assert w.t_accum.dtype == torch.int8 and w.t_accum.shape == (w.out_features, w.in_features)
        assert not w.t_accum.any()
        validate_weight(w)
    assert set_flip_counters(tree, True)["a"] is tree["a"], "counters present already are kept"


def test_stochastic_update_needs_no_counter_and_is_a_function_of_step_seed_and_index():
    n, k, gs = 32, 40, 8
    w = set_flip_counters(init_ternary(n, k, gs, gen(3)), False)
    grad = torch.randn(n, k, generator=gen(4))
    step = torch.tensor(11)
    new, flips, moves = update_weight(w, grad, 2, 32, step, seed=7, index=3)
    assert new.t_accum is None and new.trainable
    validate_weight(new)
    again, *_ = update_weight(w, grad, 2, 32, step.clone(), seed=7, index=3)
    assert torch.equal(again.packed, new.packed), "same (state, grad, step, seed, index): same flips"
    t, s = trits_of(w).to(torch.int32), _sign(grad)
    delta = trits_of(new).to(torch.int32) - t
    assert torch.all((delta == 0) | (delta == -s)) and int(flips) == int((delta != 0).sum())
    movable = int(((s < 0) & (t < 1) | (s > 0) & (t > -1)).sum())
    assert 0.3 * movable < int(flips) < 0.7 * movable, "θ 2 moves about half of the movable trits"
    for other in (dict(step=step + 1, seed=7, index=3), dict(step=step, seed=8, index=3),
                  dict(step=step, seed=7, index=4)):
        moved, *_ = update_weight(w, grad, 2, 32, **other)
        assert not torch.equal(moved.packed, new.packed), other
    with_counters, *_ = update_weight(init_ternary(n, k, gs, gen(3)), grad, 2, 32, step, seed=7, index=3)
    assert with_counters.t_accum is None and torch.equal(with_counters.packed, new.packed)


@pytest.mark.parametrize("stochastic", (False, True))
def test_update_weights_is_each_weight_updated_alone(stochastic):
    """The list update (one group op) equals one single-weight update per weight, in both flip modes: weight i
    draws from stream first_index + i, untrainable weights and missing gradients pass through as they are."""
    ws = [init_ternary(6, 23, 4, gen(1)), init_ternary(4, 64, 32, gen(2)), init_ternary(5, 10, 8, gen(3)),
          init_ternary(3, 40, 8, gen(4))]
    ws[2] = dataclasses.replace(ws[2], t_accum=None, e_accum=None)  # frozen: no accumulators
    if stochastic:
        ws = [set_flip_counters(w, False) if w.trainable else w for w in ws]
    grads = [torch.randn(w.out_features, w.in_features, generator=gen(10 + i)) for i, w in enumerate(ws)]
    grads[3] = None
    step = torch.tensor(5) if stochastic else None
    th = 2 if stochastic else 1  # counters start at 0: θ 1 flips on the first vote
    new, flips, moves = update_weights(ws, grads, th, 3, step, seed=9, first_index=4)
    assert new[2] is ws[2] and new[3] is ws[3]
    want_flips = want_moves = 0
    for i in (0, 1):
        alone = update_ops.ternary_update_stochastic(ws[i].packed, ws[i].exp, ws[i].e_accum, grads[i], step,
                                                     update_ops.flip_cutoff(step, 2), ws[i].in_features,
                                                     ws[i].group_size, 3, update_ops.stream_seed(9, 4 + i)) \
            if stochastic else update_ops.ternary_update(ws[i].packed, ws[i].exp, ws[i].t_accum, ws[i].e_accum,
                                                         grads[i], ws[i].in_features, ws[i].group_size, th, 3)
        *tensors, f, m = alone
        got = (new[i].packed, new[i].exp, new[i].e_accum) if stochastic else \
            (new[i].packed, new[i].exp, new[i].t_accum, new[i].e_accum)
        assert all(torch.equal(a, b) for a, b in zip(got, tensors, strict=True)), i
        assert (new[i].t_accum is None) == stochastic
        validate_weight(new[i])
        want_flips, want_moves = want_flips + int(f), want_moves + int(m)
    assert int(flips) == want_flips > 0 and int(moves) == want_moves
    with pytest.raises(ValueError, match="one gradient"):
        update_weights(ws, grads[:2], 2, 3, step)


def test_counter_update_of_a_weight_without_counters_raises():
    w = set_flip_counters(init_ternary(3, 7, 4, gen()), False)
    with pytest.raises(ValueError, match="counter flips need t_accum"):
        update_weight(w, torch.ones(3, 7), 8, 32)


def test_apply_update_draws_one_stream_per_tensor_and_step():
    """Two equal weights under equal gradients flip differently (their tensor numbers differ); a repeat is
    identical; the next step draws anew; counter mode on the result (no counters) refuses."""
    from arbfn.config import ModelConfig, UpdateConfig
    from arbfn.model import State
    from arbfn.train import apply_update

    w = init_ternary(16, 40, 8, gen(5))
    state = State({"a": w, "b": [w]}, torch.tensor(0), ModelConfig())
    grads = {"a": torch.randn(16, 40, generator=gen(6))}
    grads["b"] = [grads["a"]]
    update = UpdateConfig(flip_threshold=2, flip_mode="stochastic", seed=3)
    new, stats = apply_update(state, grads, update)
    again, _ = apply_update(state, grads, update)
    assert int(new.step) == 1 and all(x.t_accum is None for x in weights(new.params))
    assert not torch.equal(new.params["a"].packed, new.params["b"][0].packed)
    assert torch.equal(again.params["a"].packed, new.params["a"].packed)
    assert int(stats["flips"]) == sum(int((trits_of(x) != trits_of(w)).sum()) for x in weights(new.params))
    later, _ = apply_update(State(state.params, torch.tensor(1), state.config), grads, update)
    assert not torch.equal(later.params["a"].packed, new.params["a"].packed)
    with pytest.raises(ValueError, match="counter flips need t_accum"):
        apply_update(new, grads, UpdateConfig())


def test_apply_update_anneals_theta_with_the_state_step():
    """With a θ schedule, step 0 flips as a constant θ_0 and every step from the anneal's end as a constant θ_1;
    between them the flip count falls as θ rises."""
    from arbfn.config import ModelConfig, UpdateConfig
    from arbfn.model import State
    from arbfn.train import apply_update

    w = init_ternary(64, 120, 8, gen(7))
    grads = {"a": torch.randn(64, 120, generator=gen(8))}
    at = lambda step, update: apply_update(State({"a": w}, torch.tensor(step), ModelConfig()), grads, update)
    anneal = UpdateConfig(flip_threshold=2, flip_mode="stochastic", seed=1, flip_threshold_final=200, anneal_steps=10)
    for step, theta in ((0, 2), (10, 200), (11, 200)):
        got, want = at(step, anneal), at(step, dataclasses.replace(anneal, flip_threshold=theta, flip_threshold_final=0,
                                                                   anneal_steps=0))
        assert torch.equal(got[0].params["a"].packed, want[0].params["a"].packed) and int(got[1]["flips"]) > 0
    flips = [int(at(step, anneal)[1]["flips"]) for step in (0, 5, 10)]
    assert flips[0] > flips[1] > flips[2]


def test_a_run_config_from_before_the_flip_schedule_loads_with_a_constant_threshold():
    import json

    from arbfn.config import Config, UpdateConfig, preset

    cfg = dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_mode="stochastic", flip_threshold=64))
    old = json.loads(cfg.to_json())
    for field in ("flip_threshold_final", "anneal_steps"):  # a checkpoint written before these fields existed
        del old["update"][field]
    back = Config.from_json(json.dumps(old))
    assert back == cfg and (back.update.flip_threshold_final, back.update.anneal_steps) == (0, 0)


@pytest.mark.parametrize("bad", [dict(flip_mode="counters"), dict(flip_mode=""), dict(seed=-1), dict(seed=2**32),
                                 dict(flip_threshold=0), dict(exp_threshold=128), dict(counter_bits=5),
                                 dict(counter_bits=16), dict(counter_bits=4), dict(counter_bits=4, flip_threshold=8),
                                 dict(flip_threshold=128), dict(flip_mode="stochastic", flip_threshold=2**24 + 1),
                                 dict(flip_threshold_final=64, anneal_steps=10),
                                 dict(flip_mode="stochastic", flip_threshold_final=64),
                                 dict(flip_mode="stochastic", anneal_steps=5),
                                 dict(flip_mode="stochastic", flip_threshold_final=2**24 + 1, anneal_steps=5)])
def test_update_config_rejects_bad_knobs(bad):
    from arbfn.config import UpdateConfig

    with pytest.raises(ValueError, match="UpdateConfig"):
        UpdateConfig(**bad)
    assert UpdateConfig(flip_mode="stochastic", seed=2**32 - 1).flip_counters is False
    assert UpdateConfig().flip_counters is True and UpdateConfig().counter_bits == 8
    assert UpdateConfig(flip_threshold=7, counter_bits=4).counter_bits == 4
    assert UpdateConfig(flip_threshold=64, flip_mode="stochastic", counter_bits=4).flip_threshold == 64  # no counters
    assert UpdateConfig(flip_threshold=1000, flip_mode="stochastic", flip_threshold_final=2**24,
                        anneal_steps=1).flip_threshold == 1000  # stochastic θ needs no counter to hold it


# ---------------------------------------------------------------- 4-bit flip counters


def test_nibble_counters_update_exactly_like_int8_ones():
    """From the same counters (within ±7) and gradient, a 4-bit weight moves as the 8-bit one, step after step."""
    n, k, gs, th = 9, 23, 4, 5
    w8 = dataclasses.replace(init_ternary(n, k, gs, gen(11)),
                             t_accum=torch.randint(-7, 8, (n, k), generator=gen(12), dtype=torch.int8))
    w4 = dataclasses.replace(w8, t_accum=pack_nibbles(w8.t_accum))
    assert flip_counter_bits(w8) == 8 and flip_counter_bits(w4) == 4
    total = 0
    for step in range(6):
        grad = torch.randn(n, k, generator=gen(step))
        w8, flips8, moves8 = update_weight(w8, grad, th, 3)
        w4, flips4, moves4 = update_weight(w4, grad, th, 3, counter_bits=4)
        validate_weight(w4)
        assert w4.t_accum.dtype == torch.uint8 and w4.t_accum.shape == (n, 12)
        assert torch.equal(unpack_nibbles(w4.t_accum, k), w8.t_accum)
        for f in ("packed", "exp", "e_accum"):
            assert torch.equal(getattr(w4, f), getattr(w8, f)), f
        assert int(flips4) == int(flips8) and int(moves4) == int(moves8)
        total += int(flips8)
    assert total > 0


def test_update_weight_refuses_a_counter_width_mismatch():
    w8 = init_ternary(3, 7, 4, gen())
    w4 = set_flip_counters(set_flip_counters(w8, False), True, 4)
    for w, bits in ((w8, 4), (w4, 8)):
        with pytest.raises(ValueError, match=f"asks for {bits}-bit"):
            update_weight(w, torch.ones(3, 7), 5, 32, counter_bits=bits)
    with pytest.raises(ValueError, match="at most 7 for 4-bit"):
        update_weight(w4, torch.ones(3, 7), 8, 32, counter_bits=4)


def test_set_flip_counters_lays_out_nibbles():
    frozen = dataclasses.replace(init_ternary(2, 8, 4, gen()), t_accum=None, e_accum=None)
    tree = {"a": init_ternary(4, 13, 4, gen(1)), "b": [init_ternary(3, 6, 4, gen(2))], "frozen": frozen}
    nibbles = set_flip_counters(set_flip_counters(tree, False), True, 4)
    assert nibbles["frozen"] is frozen
    for w in (nibbles["a"], nibbles["b"][0]):
        assert w.t_accum.dtype == torch.uint8 and w.t_accum.shape == (w.out_features, -(-w.in_features // 2))
        assert not w.t_accum.any() and flip_counter_bits(w) == 4
        validate_weight(w)
    assert set_flip_counters(nibbles, True, 4)["a"] is nibbles["a"], "counters of the width asked for are kept"
    assert all(w.t_accum is None for w in weights(set_flip_counters(nibbles, False, 4)))
    with pytest.raises(ValueError, match="flip counters are 8-bit.*asks for 4-bit"):
        set_flip_counters(tree, True, 4)
    with pytest.raises(ValueError, match="flip counters are 4-bit.*asks for 8-bit"):
        set_flip_counters(nibbles, True)
    with pytest.raises(ValueError, match="counter_bits"):
        set_flip_counters(tree, True, 2)


def test_validate_weight_checks_the_nibble_layout():
    w = set_flip_counters(set_flip_counters(init_ternary(3, 7, 4, gen()), False), True, 4)  # 4 bytes, 1 padding nibble
    validate_weight(w)
    for bad, match in ((w.t_accum[:, :3], "t_accum must be torch.uint8"),
                       (torch.zeros((3, 7), dtype=torch.uint8), r"t_accum must be torch.uint8 \(3, 4\)"),
                       (torch.full((3, 4), 0x10, dtype=torch.uint8), "padding nibbles")):
        with pytest.raises(ValueError, match=match):
            validate_weight(dataclasses.replace(w, t_accum=bad))
    validate_weight(dataclasses.replace(w, t_accum=torch.full((3, 4), 0x0F, dtype=torch.uint8)))  # -1 in column 6
    even = set_flip_counters(set_flip_counters(init_ternary(3, 8, 4, gen()), False), True, 4)
    validate_weight(dataclasses.replace(even, t_accum=torch.full((3, 4), 0xF8, dtype=torch.uint8)))  # no padding


# ---------------------------------------------------------------- dithered flip counters


def test_dither_draws_counters_in_range_deterministically():
    tree = {"a": init_ternary(7, 13, 4, torch.Generator().manual_seed(0)),
            "b": init_ternary(3, 5, 4, torch.Generator().manual_seed(1))}
    one = dither_flip_counters(tree, 8, torch.Generator().manual_seed(5))
    two = dither_flip_counters(tree, 8, torch.Generator().manual_seed(5))
    for name in tree:
        t = one[name].t_accum
        assert t.dtype == torch.int8 and t.min() >= -7 and t.max() <= 7 and t.unique().numel() > 3
        assert torch.equal(t, two[name].t_accum)
        assert torch.equal(one[name].packed, tree[name].packed) and torch.equal(one[name].exp, tree[name].exp)
    assert torch.equal(dither_flip_counters(tree, 1, torch.Generator())["a"].t_accum, tree["a"].t_accum)  # θ=1: 0
    with pytest.raises(ValueError, match="flip_threshold"):
        dither_flip_counters(tree, 128, torch.Generator())


def test_dithered_nibbles_are_the_int8_draws_packed():
    tree = {"a": init_ternary(7, 13, 4, torch.Generator().manual_seed(0)),
            "b": init_ternary(3, 5, 4, torch.Generator().manual_seed(1))}
    nibbles = set_flip_counters(set_flip_counters(tree, False), True, 4)
    one = dither_flip_counters(tree, 7, torch.Generator().manual_seed(5))
    four = dither_flip_counters(nibbles, 7, torch.Generator().manual_seed(5))
    for name in tree:
        w = four[name]
        assert w.t_accum.dtype == torch.uint8 and torch.equal(w.t_accum, pack_nibbles(one[name].t_accum))
        validate_weight(w)
    assert max(int(unpack_nibbles(w.t_accum, w.in_features).abs().max()) for w in four.values()) == 6
    with pytest.raises(ValueError, match="1..7 for 4-bit"):
        dither_flip_counters(nibbles, 8, torch.Generator())


def test_init_model_dithers_counters_without_changing_weights():
    from arbfn.config import UpdateConfig, preset
    from arbfn.model import init_model

    cfg = preset("tiny")
    plain = init_model(dataclasses.replace(cfg, update=dataclasses.replace(cfg.update, dither=False)),
                       torch.Generator().manual_seed(0))
    dithered = init_model(cfg, torch.Generator().manual_seed(0))
    for a, b in zip(weights(plain.params), weights(dithered.params)):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.exp, b.exp)
        if a.trainable:
            assert not a.t_accum.any() and b.t_accum.abs().max() == cfg.update.flip_threshold - 1
    # 4-bit counters: the same weights and the same draws (at the same θ), packed
    at = {bits: init_model(dataclasses.replace(cfg, update=UpdateConfig(flip_threshold=6, counter_bits=bits)),
                           torch.Generator().manual_seed(0)) for bits in (8, 4)}
    for a, b, c in zip(weights(plain.params), weights(at[8].params), weights(at[4].params)):
        assert torch.equal(a.packed, c.packed) and torch.equal(a.exp, c.exp)
        if a.trainable:
            assert flip_counter_bits(c) == 4 and torch.equal(c.t_accum, pack_nibbles(b.t_accum))


def test_dithered_counters_spread_the_first_flips():
    """Under a gradient sign that never changes, zero counters flip every movable trit at step θ together;
    dithered ones flip from step 1 on and never all in one step."""
    theta = 8
    w0 = init_ternary(64, 40, 8, torch.Generator().manual_seed(0))
    grad = torch.full((64, 40), -1.0)  # every vote says "up"
    movable = int((unpack_reference(w0.packed, 40) < 1).sum())

    def flips_per_step(w):
        out = []
        for _ in range(theta):
            w, flips, _ = update_weight(w, grad, theta, 127)
            out.append(int(flips))
        return out

    zero = flips_per_step(w0)
    assert zero[:-1] == [0] * (theta - 1) and zero[-1] == movable
    spread = flips_per_step(dither_flip_counters(w0, theta, torch.Generator().manual_seed(3)))
    assert spread[0] > 0 and max(spread) < movable
