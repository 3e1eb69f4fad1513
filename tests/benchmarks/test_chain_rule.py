"""The chain rule prototype (benchmarks/chain_rule.py): its places, probabilities and moves, and one short run."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn.audit import audit
from arbfn.compare import byte_path_config
from arbfn.config import UpdateConfig, preset
from arbfn.model import init_model
from arbfn.ternary import is_ternary, weights
from benchmarks.chain_rule import (ChainRule, ChainTrainer, bytes_per_weight, move_probability, norm_gains,
                                   parse_setting, run, start_places, step_places, trits_of)
from kernels.packing import unpack_reference


def test_settings_parse_into_rules():
    assert parse_setting("6:1:64") == ChainRule(6, 1.0, 64.0, False)
    assert parse_setting("12:0.5:16:frozen") == ChainRule(12, 0.5, 16.0, True)
    assert parse_setting("6:0.5:64:3") == ChainRule(6, 0.5, 64.0, False, 3.0)
    assert parse_setting("6:0.5:64:3:frozen") == ChainRule(6, 0.5, 64.0, True, 3.0)
    assert parse_setting("6:0.5:64:3:outer:frozen:fixed-norms:cosine") == ChainRule(
        6, 0.5, 64.0, True, 3.0, outer=True, cosine=True, fixed_norms=True)  # flags in any order
    assert parse_setting("6:1:64:cosine") == ChainRule(6, 1.0, 64.0, cosine=True)
    assert parse_setting("6:2:64:3:rms").rms
    assert [ChainRule(s).place_bits for s in (3, 6, 12, 24)] == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", ["6:1", "6:1:64:thawed", "5:1:64", "6:-1:64", "6:1:0.5", "x:1:64", "6:1:64:0",
                                 "6:1:64:frozen:3", "6:1:64:2:3", "6:1:64:outer:outer",
                                 "6:1:64:cosine:3", "6:1:64:inner"])
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        parse_setting(bad)


@pytest.mark.parametrize("states", [3, 6, 12])
def test_start_places_read_back_as_the_trits_and_fill_each_level(states):
    trits = torch.tensor([-1, 0, 1] * 400, dtype=torch.int8).view(30, 40)
    places = start_places(trits, states, torch.Generator().manual_seed(0))
    assert torch.equal(trits_of(places, states), trits.to(torch.int64))
    assert set(places.unique().tolist()) == set(range(states))  # every place of every level is drawn


@pytest.mark.parametrize("states", [6, 12])
def test_outer_starts_put_nonzero_trits_at_the_far_end_of_their_level(states):
    trits = torch.tensor([-1, 0, 1] * 400, dtype=torch.int8).view(30, 40)
    places = start_places(trits, states, torch.Generator().manual_seed(0), outer=True)
    assert torch.equal(trits_of(places, states), trits.to(torch.int64))
    t = trits.to(torch.int64)
    assert set(places[t < 0].tolist()) == {0} and set(places[t > 0].tolist()) == {states - 1}
    per = states // 3
    assert set(places[t == 0].tolist()) == set(range(per, 2 * per))  # zeros still fill their level


def test_move_probability_is_magnitude_over_the_group_max():
    g = torch.tensor([[1.0, -2.0, 4.0, 0.0, 3.0, -6.0, 0.0, 0.0, 0.0, 0.0]])  # groups of 4: the last one padded
    p = move_probability(g, 4, 1.0)
    assert torch.allclose(p, torch.tensor([[0.25, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(move_probability(g, 4, 2.0), p / 2)
    assert torch.equal(move_probability(g, 4, 0.0), torch.ones_like(g))
    assert torch.allclose(move_probability(g, 4, 0.5, 3.0), (2 * p).clamp(max=1.0) ** 3)  # capped, then the power


def test_rms_flag_divides_by_the_groups_root_mean_square_over_its_real_columns():
    g = torch.tensor([[3.0, -4.0, 0.0, 0.0, 2.0, 2.0]])  # groups of 4: rms 2.5 over 4 columns, 2 over the last 2
    expected = torch.tensor([[3 / 2.5, 4 / 2.5, 0.0, 0.0, 1.0, 1.0]]) / 2
    assert torch.allclose(move_probability(g, 4, 2.0, rms=True), expected.clamp(max=1.0))
    assert torch.allclose(move_probability(g, 4, 1.0, 3.0, rms=True), (2 * expected).clamp(max=1.0) ** 3)


def test_step_places_moves_against_the_gradient_within_the_chain():
    gen = torch.Generator().manual_seed(0)
    places = torch.tensor([[0, 0, 5, 5, 2, 3]])
    g = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0, -1.0]])
    moved = step_places(places, g, torch.ones_like(g), 6, gen)
    assert moved.tolist() == [[0, 1, 4, 5, 2, 4]]  # ends hold; a zero gradient casts no vote
    assert torch.equal(step_places(places, g, torch.zeros_like(g), 6, gen), places)


def test_rate_falls_geometrically_to_one_over_final():
    t = ChainTrainer(ChainRule(6, 1.0, 64.0), steps=10, seed=0)
    assert t.rate(0) == 1.0
    assert t.rate(5) == pytest.approx(1 / 8)
    assert t.rate(10) == pytest.approx(1 / 64) == t.rate(99)
    with pytest.raises(ValueError):
        ChainTrainer(ChainRule(), steps=0, seed=0)


def test_cosine_rate_runs_from_one_to_one_over_final():
    t = ChainTrainer(ChainRule(6, 1.0, 64.0, cosine=True), steps=10, seed=0)
    assert t.rate(0) == 1.0
    assert t.rate(5) == pytest.approx((1 + 1 / 64) / 2)  # halfway down, where the geometric rate is at 1/8
    assert t.rate(10) == pytest.approx(1 / 64) == t.rate(99)


def test_fixed_norms_keep_their_gains_and_drop_their_bits():
    cfg = byte_path_config(dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_mode="stochastic")))
    state = init_model(cfg, torch.Generator().manual_seed(0))
    norms = norm_gains(state.params)
    keys = [pytree.keystr(path) for path, x in pytree.tree_flatten_with_path(state.params, is_leaf=is_ternary)[0]
            if is_ternary(x)]
    assert norms and all("norm" in keys[i] for i in norms)
    assert {i for i, k in enumerate(keys) if "norm" in k} == norms
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    trainer = ChainTrainer(ChainRule(6, 0.0, 1.0, fixed_norms=True), steps=2, seed=0)  # every vote moves
    new, _ = trainer(state, batch, cfg)
    before, after = weights(state.params), weights(new.params)
    assert all(torch.equal(before[i].packed, after[i].packed) for i in norms)
    assert not norms & trainer.places.keys()
    assert any(not torch.equal(before[i].packed, after[i].packed) for i in trainer.places)
    free, fixed = (bytes_per_weight(state, ChainRule(6, fixed_norms=f)) for f in (False, True))
    norm_weights = sum(before[i].num_weights for i in norms)
    norm_bytes = norm_weights // 8 + sum(before[i].e_accum.numel() for i in norms)
    assert free - fixed == pytest.approx(norm_bytes / audit(state)["ternary_weights"])


def test_a_short_run_learns_keeps_its_trits_on_the_chain_and_counts_the_bits():
    moving, frozen = run(ChainRule(6, 1.0, 64.0), steps=3, seed=0), run(ChainRule(6, 1.0, 64.0, True), 3, seed=0)
    for r in (moving, frozen):
        assert r["curve"][-1] < r["curve"][0]  # 3 steps from the random init already lower the held-out loss
        assert r["ratio"] == pytest.approx(r["bpb_ternary"] / r["bpb_float"])
    counter_free = run(ChainRule(3, 0.0, 64.0), steps=3, seed=0)["bytes_per_weight"]
    assert moving["bytes_per_weight"] == pytest.approx(counter_free + 0.125, abs=0.01)  # one bit a weight
    assert frozen["bytes_per_weight"] < moving["bytes_per_weight"] - 0.02  # no exponent accumulators


def test_trainer_trits_are_the_levels_of_its_places():
    cfg = byte_path_config(dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_mode="stochastic")))
    state = init_model(cfg, torch.Generator().manual_seed(0))
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    trainer = ChainTrainer(ChainRule(6, 1.0, 4.0), steps=2, seed=0)
    for _ in range(2):
        state, _ = trainer(state, batch, cfg)
    ws = [w for w in pytree.tree_leaves(state.params, is_leaf=is_ternary) if is_ternary(w)]  # numbered as trained
    assert trainer.places and int(state.step) == 2
    for number, places in trainer.places.items():
        w = ws[number]
        assert torch.equal(unpack_reference(w.packed, w.in_features).to(torch.int64), trits_of(places, 6))


def test_a_wider_exponent_group_halves_the_exponent_bytes():
    base, wide = run(ChainRule(6, 1.0, 64.0, True), 1, seed=0), run(ChainRule(6, 1.0, 64.0, True), 1, 0, group_size=64)
    assert (base["group_size"], wide["group_size"]) == (32, 64)
    assert wide["bytes_per_weight"] == pytest.approx(base["bytes_per_weight"] - 1 / 64, abs=0.003)  # 1/32 -> 1/64 B

