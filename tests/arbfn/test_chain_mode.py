"""The chain flip mode (UpdateConfig.flip_mode "chain") through the library: config, the state's layout and its
bytes, train steps, checkpoints, the cosine schedule and the CLI."""

import dataclasses
import json
import math

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn import data
from arbfn.audit import audit
from arbfn.checkpoint import load_run, save
from arbfn.cli import main
from arbfn.compare import byte_path_config
from arbfn.config import Config, UpdateConfig, preset
from arbfn.model import init_model, is_norm_gain
from arbfn.ternary import (CHAIN_BITS, flip_counter_bits, init_ternary, is_ternary, set_chain_places, set_flip_counters,
                           update_chain_weights, validate_weight, weights)
from arbfn.train import train_step
from kernels.packing import unpack_reference
from kernels.update import flip_cutoff
from kernels.update_chain import unpack_places

CHAIN = UpdateConfig(flip_mode="chain", flip_threshold=1, flip_threshold_final=128, anneal_steps=200,
                     anneal_shape="cosine", seed=3, fixed_norm_gains=True)


def chain_config(group_size: int = 64) -> Config:
    cfg = preset("tiny")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, group_size=group_size), update=CHAIN)


def named_weights(state) -> list[tuple[tuple, object]]:
    return [(path, w) for path, w in pytree.tree_flatten_with_path(state.params, is_leaf=is_ternary)[0]
            if is_ternary(w)]


def test_chain_knobs_are_checked_and_belong_to_chain_mode():
    assert CHAIN.chain_scale == 2.0 and CHAIN.chain_power == 3.0
    for bad in ({"chain_scale": 0.0}, {"chain_power": -1.0}, {"chain_scale": math.inf}, {"anneal_shape": "linear"},
                {"flip_mode": "chained"}):
        with pytest.raises(ValueError):
            dataclasses.replace(CHAIN, **bad)
    with pytest.raises(ValueError, match="shapes chain flips"):
        UpdateConfig(flip_mode="stochastic", chain_power=2.0)
    with pytest.raises(ValueError, match="counter mode has no schedule"):
        UpdateConfig(anneal_shape="cosine")
    cfg = chain_config()
    assert Config.from_json(cfg.to_json()) == cfg


def test_a_fresh_chain_state_keeps_place_bits_fixed_exponents_and_fixed_norm_gains():
    state = init_model(chain_config(), torch.Generator().manual_seed(0))
    norms = 0
    for path, w in named_weights(state):
        validate_weight(w)
        if is_norm_gain(path):
            norms += 1
            assert w.t_accum is None and w.e_accum is None and not w.trainable
            continue
        assert flip_counter_bits(w) == CHAIN_BITS and w.e_accum is None and w.trainable
        t, b = unpack_reference(w.packed, w.in_features), unpack_places(w.t_accum, w.in_features)
        assert b[t > 0].eq(1).all() and b[t < 0].eq(0).all()  # nonzero trits start at their level's outer place
    assert norms == 5  # two per block, and the final norm
    zero_bits = torch.cat([unpack_places(w.t_accum, w.in_features)[unpack_reference(w.packed, w.in_features) == 0]
                           for path, w in named_weights(state) if not is_norm_gain(path)])
    assert 0.45 < zero_bits.float().mean().item() < 0.55  # zero trits' places drawn from the init generator
    again = init_model(chain_config(), torch.Generator().manual_seed(0))
    assert all(torch.equal(a.t_accum, b.t_accum) for a, b in zip(weights(state.params), weights(again.params))
               if a.t_accum is not None)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_chain_byte_path_is_under_0_35_bytes_per_weight_at_group_size_64(name):
    """Trits 1/5 + one place bit 1/8 + an int8 exponent per 64 weights (padding aside): 0.344 on tiny's byte path
    (what compare trains), 0.342 on small's; exponents per 32 weights do not fit. The whole preset adds the
    graph's and VQ's own state (0.38 on tiny)."""
    cfg = dataclasses.replace(chain_config(), model=dataclasses.replace(preset(name).model, group_size=64))
    report = audit(init_model(byte_path_config(cfg)), strict=True)  # shape-only, and no float tensor
    assert 0.34 <= report["bytes_per_weight"] <= 0.35
    narrow = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, group_size=32))
    assert audit(init_model(byte_path_config(narrow)))["bytes_per_weight"] > 0.35
    stochastic = dataclasses.replace(cfg, update=UpdateConfig(flip_mode="stochastic"))
    whole = audit(init_model(cfg))
    extra = whole["state_bytes"] - audit(init_model(stochastic))["state_bytes"]
    assert extra == pytest.approx(whole["ternary_weights"] * 0.108, rel=0.05)  # a bit a weight, less e_accum


def test_a_place_bit_beyond_the_row_is_rejected():
    gen = torch.Generator().manual_seed(0)
    (w,) = set_chain_places([init_ternary(3, 21, 8, gen)], gen)
    validate_weight(w)
    bad = w.t_accum.clone()
    bad[0, -1] |= 1 << (w.in_features % 16)
    with pytest.raises(ValueError, match="place bits beyond in_features"):
        validate_weight(dataclasses.replace(w, t_accum=bad))


def test_chain_steps_move_trits_but_no_exponent_nor_norm_gain():
    cfg = chain_config()
    state = init_model(cfg, torch.Generator().manual_seed(0))
    stream = data.iterate_batches(data.load_corpus(), 8, 32, 0)
    new, flips = state, 0
    for _ in range(3):
        new, m = train_step(new, next(stream), cfg)
        flips += int(m["flips"])
        assert int(m["exp_moves"]) == 0
    assert flips > 0 and int(new.step) == 3
    moved_places = 0
    for (path, old), (_, w) in zip(named_weights(state), named_weights(new)):
        assert torch.equal(old.exp, w.exp)
        if is_norm_gain(path):
            assert torch.equal(old.packed, w.packed)
        elif w.t_accum is not None:
            moved_places += int((old.t_accum != w.t_accum).sum())
    assert moved_places > 0
    again = init_model(cfg, torch.Generator().manual_seed(0))
    stream = data.iterate_batches(data.load_corpus(), 8, 32, 0)
    for _ in range(3):
        again, _ = train_step(again, next(stream), cfg)
    assert all(torch.equal(a.packed, b.packed) for a, b in zip(weights(new.params), weights(again.params)))


def test_chain_updates_need_place_bits():
    stochastic = init_model(dataclasses.replace(chain_config(), update=UpdateConfig(flip_mode="stochastic")),
                            torch.Generator().manual_seed(0))
    w = weights(stochastic.params)[0]
    grad = torch.ones((w.out_features, w.in_features))
    with pytest.raises(ValueError, match="chain flips need place bits"):
        update_chain_weights([w], [grad], torch.tensor(0), torch.tensor(1 << 24), 2.0, 3.0)
    with pytest.raises(ValueError, match="one gradient"):
        update_chain_weights([w], [], torch.tensor(0), torch.tensor(1 << 24), 2.0, 3.0)


def test_chain_states_round_trip_through_checkpoints(tmp_path):
    cfg = chain_config()
    state = init_model(cfg, torch.Generator().manual_seed(0))
    state, _ = train_step(state, next(data.iterate_batches(data.load_corpus(), 4, 32, 0)), cfg)
    for given in (cfg, None):
        back, got = load_run(save(state, tmp_path / f"{given is None}.safetensors", given))
        assert got.update.flip_mode == "chain"
        assert pytree.tree_structure(back) == pytree.tree_structure(state)
        leaves = zip(pytree.tree_leaves(back), pytree.tree_leaves(state))
        assert all(torch.equal(a, b) for a, b in leaves if isinstance(a, torch.Tensor))
    with pytest.raises(ValueError, match="chain state's layout belongs to its run"):
        set_flip_counters(state, False)


def test_cosine_schedule_holds_the_rate_then_falls_to_the_final_threshold():
    cut = [int(flip_cutoff(torch.tensor(s), 1, 128, 200, "cosine")) for s in (0, 100, 199, 200, 500)]
    assert cut[0] == 1 << 24 and cut[3] == cut[4] == (1 << 24) // 128
    assert cut[1] == math.floor((1 << 24) * (1 / 128 + (1 - 1 / 128) / 2))  # halfway: the mean of both rates
    assert cut[2] > cut[3]
    geometric = int(flip_cutoff(torch.tensor(100), 1, 128, 200))
    assert geometric < cut[1]  # the cosine keeps moves faster in the middle of the run
    with pytest.raises(ValueError, match="shape must be one of"):
        flip_cutoff(torch.tensor(0), 1, 128, 200, "linear")


def test_compare_cli_trains_the_chain(capsys):
    args = ["compare", "--preset", "tiny", "--steps", "2", "--eval-every", "2", "--flip-mode", "chain",
            "--flip-threshold", "1", "--flip-threshold-final", "128", "--anneal-shape", "cosine", "--group-size", "64",
            "--fixed-norm-gains"]
    assert main([*args, "--json", "--out", "/tmp/arbfn-test-chain"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["update"]["flip_mode"] == "chain" and result["update"]["anneal_shape"] == "cosine"
    assert result["update"]["fixed_norm_gains"]
    assert result["bytes_per_weight"] < 0.35 and math.isfinite(result["bpb_ternary"])
    assert main([*args, "--chain-power", "2", "--chain-scale", "1.5", "--out", "/tmp/arbfn-test-chain"]) == 0
    table = capsys.readouterr().out
    assert "chain flips (scale 1.5, power 2)" in table and "exponents fixed, norm gains fixed" in table
    assert main(["compare", "--preset", "tiny", "--steps", "1", "--chain-power", "2"]) == 2
    assert "shapes chain flips" in capsys.readouterr().err


def test_train_cli_keeps_a_checkpoints_group_size(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--flip-mode", "chain", "--group-size", "64",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    _, cfg = load_run(next(out.glob("*.safetensors")))
    assert cfg.model.group_size == 64 and cfg.update.flip_mode == "chain"
    assert main(["train", "--resume", str(next(out.glob("*.safetensors"))), "--steps", "2", "--group-size", "32",
                 "--out", str(tmp_path / "again"), "--quiet", "--device", "cpu"]) == 2
    assert "--group-size 32 differs from the checkpoint's 64" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_chain_step_equals_the_eager_one():
    """The compiled objective feeds the same chain update: its first step from a fresh state is bit-exact on CPU."""
    from arbfn.compiled import CompiledTrainStep

    cfg = chain_config()
    state = init_model(cfg, torch.Generator().manual_seed(0))
    batch = data.sample_batch(data.load_corpus(), 2, 32, torch.Generator().manual_seed(0))  # MoE dense path
    (eager, em), (compiled, cm) = train_step(state, batch, cfg), CompiledTrainStep(cfg)(state, batch)
    assert int(em["flips"]) > 0 and int(em["flips"]) == int(cm["flips"])
    pairs = zip(pytree.tree_leaves(eager), pytree.tree_leaves(compiled))
    assert all(torch.equal(a, b) for a, b in pairs if isinstance(a, torch.Tensor))


def test_data_parallel_chain_flips_need_the_fp32_exchange(capsys):
    """Vote exchanges carry only the signs of the gradients; the chain weighs each vote by its magnitude. With the
    fp32 exchange a step in a world of one equals the train step (2-rank runs of that exchange: test_distributed)."""
    from arbfn import distributed

    for exchange in ("trits", "int8"):
        with pytest.raises(ValueError, match="use exchange 'fp32'"):
            distributed.check_update(CHAIN, exchange)
    distributed.check_update(CHAIN, "fp32")
    distributed.check_update(UpdateConfig(flip_mode="stochastic"), "trits")
    cfg = chain_config()
    state = init_model(cfg, torch.Generator().manual_seed(0))
    batch = next(data.iterate_batches(data.load_corpus(), 4, 32, 0))
    with pytest.raises(ValueError, match="use exchange 'fp32'"):
        distributed.data_parallel_step(state, batch, cfg)
    (dp, _), (ref, _) = distributed.data_parallel_step(state, batch, cfg, "fp32"), train_step(state, batch, cfg)
    assert distributed.state_digest(dp) == distributed.state_digest(ref)
    assert main(["train", "--preset", "tiny", "--steps", "1", "--flip-mode", "chain", "--nproc", "2",
                 "--out", "/tmp/arbfn-test-chain-dp", "--quiet"]) == 2
    assert "--exchange fp32" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["counter", "stochastic", "chain"])
def test_fixed_norm_gains_hold_no_accumulator_in_any_mode_and_do_not_move(mode, tmp_path):
    update = dataclasses.replace(CHAIN, flip_mode=mode) if mode == "chain" else UpdateConfig(
        flip_mode=mode, fixed_norm_gains=True, **({"flip_threshold": 2} if mode == "counter" else {}))
    cfg = dataclasses.replace(chain_config(), update=update)
    state = init_model(cfg, torch.Generator().manual_seed(0))
    for path, w in named_weights(state):
        assert w.trainable != is_norm_gain(path)
    new, m = train_step(state, next(data.iterate_batches(data.load_corpus(), 4, 32, 0)), cfg)
    assert int(m["flips"]) > 0
    for (path, old), (_, w) in zip(named_weights(state), named_weights(new)):
        assert not is_norm_gain(path) or torch.equal(old.packed, w.packed)
    back, got = load_run(save(new, tmp_path / "auto.safetensors"))  # the layout tells the knob
    assert got.update.fixed_norm_gains and got.update.flip_mode == mode
    assert pytree.tree_structure(back) == pytree.tree_structure(new)
    if mode != "chain":
        trained = dataclasses.replace(cfg, update=dataclasses.replace(update, fixed_norm_gains=False))
        with pytest.raises(ValueError, match="norm gains hold no accumulators"):
            save(new, tmp_path / "bad.safetensors", trained)
        plain = init_model(trained, torch.Generator().manual_seed(0))  # saved with the knob: norm accumulators go
        _, got = load_run(save(plain, tmp_path / "fixed.safetensors", cfg))
        assert got.update.fixed_norm_gains


def test_chain_without_fixed_norm_gains_trains_them():
    cfg = dataclasses.replace(chain_config(), update=dataclasses.replace(CHAIN, fixed_norm_gains=False))
    state = init_model(cfg, torch.Generator().manual_seed(0))
    gains = [w for path, w in named_weights(state) if is_norm_gain(path)]
    assert gains and all(flip_counter_bits(w) == CHAIN_BITS and w.e_accum is None for w in gains)
