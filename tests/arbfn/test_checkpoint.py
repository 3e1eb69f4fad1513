"""Tests of arbfn.checkpoint: bit-exact round trip, atomic writes, and rejection of every bad file."""

import dataclasses
import json
import os
import struct

import pytest
import safetensors
import safetensors.torch
import torch
import torch.utils._pytree as pytree

from arbfn import checkpoint, data
from arbfn.checkpoint import FORMAT, CheckpointError, _digest, load, load_config, load_run, save
from arbfn.config import Config, ModelConfig, UpdateConfig, preset
from arbfn.model import State, init_model
from arbfn.ternary import flip_counter_bits, set_flip_counters, weights
from arbfn.train import train_step

CFG = dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_threshold=2, exp_threshold=3))
TINY_D_FF, TINY_D_MODEL = CFG.model.d_ff, CFG.model.d_model


def tensors(state: State) -> dict[str, torch.Tensor]:
    return {pytree.keystr(p): t for p, t in pytree.tree_flatten_with_path(state)[0] if isinstance(t, torch.Tensor)}


@pytest.fixture(scope="module")
def trained() -> State:
    """The tiny model after 3 train steps with low thresholds: trits, exponents, accumulators and step all moved."""
    state = init_model(CFG, torch.Generator().manual_seed(0))
    stream = data.iterate_batches(data.load_corpus(), 4, 32, 0)
    flips = moves = 0
    for _ in range(3):
        state, m = train_step(state, next(stream), CFG)
        flips, moves = flips + int(m["flips"]), moves + int(m["exp_moves"])
    assert flips > 0 and moves > 0
    return state


@pytest.fixture
def saved(trained, tmp_path):
    return save(trained, tmp_path / "ckpt.safetensors", CFG)


def read_raw(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_raw(path, tensors: dict[str, torch.Tensor], meta: dict[str, str], resign: bool = True) -> None:
    """Write a checkpoint by hand; ``resign`` stores a correct SHA-256 so only the other checks can object."""
    meta = dict(meta)
    if resign:
        meta["sha256"] = _digest(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


# ---------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(trained, saved):
    state, cfg = load_run(saved)
    assert cfg == CFG and state.config == trained.config
    assert int(state.step) == 3 == int(trained.step)
    a, b = tensors(state), tensors(trained)
    assert list(a) == list(b) and len(a) == len(checkpoint._named_leaves(trained))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
    assert pytree.tree_structure(state) == pytree.tree_structure(trained)
    assert load_config(saved) == CFG
    assert all(w.probe is None for w in weights(state.params))
    # load() is load_run() without the config
    assert all(torch.equal(x, y) for x, y in zip(tensors(load(saved)).values(), a.values()))


def test_metadata_and_names(saved):
    raw, meta = read_raw(saved)
    assert meta["format"] == FORMAT and Config.from_json(meta["config"]) == CFG
    assert meta["sha256"] == _digest(raw)
    assert "step" in raw and "params.head.packed" in raw and "params.blocks.1.mlp.up.t_accum" in raw


def test_save_default_config_and_mismatch(trained, tmp_path):
    path = save(trained, tmp_path / "sub" / "x.safetensors")  # creates the folder
    cfg = load_config(path)
    assert cfg.name == "custom" and cfg.model == trained.config
    other = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, n_layers=3))
    with pytest.raises(ValueError, match="differs"):
        save(trained, tmp_path / "y.safetensors", other)
    # without a run config, a model whose max_context is below the default train context still saves
    small = init_model(ModelConfig(d_model=16, n_layers=1, d_ff=32, max_context=16, group_size=8),
                       torch.Generator().manual_seed(0))
    back, cfg = load_run(save(small, tmp_path / "small.safetensors"))
    assert cfg.model == small.config and cfg.train.context <= 16
    assert all(torch.equal(x, y) for x, y in zip(tensors(back).values(), tensors(small).values()))


STOCHASTIC = dataclasses.replace(CFG, update=UpdateConfig(flip_threshold=2, exp_threshold=3, flip_mode="stochastic",
                                                          seed=5))


def test_stochastic_state_saves_without_counters_and_round_trips(tmp_path):
    """A stochastic-flip state has no t_accum in the file; it loads bit-exact, with or without a given config."""
    state = init_model(STOCHASTIC, torch.Generator().manual_seed(0))  # laid out with counters: save drops them
    state, m = train_step(state, next(data.iterate_batches(data.load_corpus(), 4, 32, 0)), STOCHASTIC)
    assert int(m["flips"]) > 0 and all(w.t_accum is None for w in weights(state.params))
    for cfg in (STOCHASTIC, None):
        path = save(state, tmp_path / f"{cfg is None}.safetensors", cfg)
        raw, _ = read_raw(path)
        assert not [name for name in raw if name.endswith("t_accum")] and "params.head.e_accum" in raw
        back, got = load_run(path)
        assert got.update.flip_mode == "stochastic"
        assert pytree.tree_structure(back) == pytree.tree_structure(state)
        assert all(torch.equal(x, y) for x, y in zip(tensors(back).values(), tensors(state).values()))
    fresh = save(init_model(STOCHASTIC, torch.Generator().manual_seed(0)), tmp_path / "fresh.safetensors", STOCHASTIC)
    assert all(w.t_accum is None for w in weights(load(fresh).params))


def test_counter_config_saves_a_stochastic_state_with_zero_counters(trained, tmp_path):
    stochastic_state = set_flip_counters(trained, False)
    back = load(save(stochastic_state, tmp_path / "c.safetensors", CFG))
    assert all(w.t_accum is not None and not w.t_accum.any() for w in weights(back.params))
    raw, meta = read_raw(save(stochastic_state, tmp_path / "s.safetensors", STOCHASTIC))
    del meta["sha256"]
    write_raw(tmp_path / "bad.safetensors", raw, {**meta, "config": CFG.to_json()})  # counters expected, absent
    with pytest.raises(CheckpointError, match=r"missing: \['params.blocks.0.attn.k.t_accum'"):
        load(tmp_path / "bad.safetensors")


NIBBLES = dataclasses.replace(CFG, update=UpdateConfig(flip_threshold=2, exp_threshold=3, counter_bits=4))


@pytest.fixture(scope="module")
def nibble_state() -> State:
    """The tiny model with 4-bit flip counters after 2 train steps."""
    state = init_model(NIBBLES, torch.Generator().manual_seed(0))
    stream = data.iterate_batches(data.load_corpus(), 4, 32, 0)
    for _ in range(2):
        state, m = train_step(state, next(stream), NIBBLES)
        assert int(m["flips"]) > 0
    return state


def test_nibble_state_round_trips_with_or_without_a_config(nibble_state, tmp_path):
    for cfg in (NIBBLES, None):
        path = save(nibble_state, tmp_path / f"{cfg is None}.safetensors", cfg)
        raw, _ = read_raw(path)
        counters = raw["params.blocks.0.mlp.up.t_accum"]
        assert counters.dtype == torch.uint8 and counters.shape == (TINY_D_FF, TINY_D_MODEL // 2)
        back, got = load_run(path)
        assert got.update.counter_bits == 4 and (cfg is None or got == NIBBLES)
        assert all(flip_counter_bits(w) == 4 for w in weights(back.params))
        a, b = tensors(back), tensors(nibble_state)
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)


@pytest.mark.parametrize("stored,claimed", [("nibbles", CFG), ("int8", NIBBLES)])
def test_a_checkpoint_loads_only_in_its_counter_width(nibble_state, trained, tmp_path, stored, claimed):
    """Tensors of one width under a config of the other (a correct digest): a clear CheckpointError."""
    state, cfg = (nibble_state, NIBBLES) if stored == "nibbles" else (trained, CFG)
    raw, meta = read_raw(save(state, tmp_path / "c.safetensors", cfg))
    write_raw(tmp_path / "other.safetensors", raw, {**meta, "config": claimed.to_json()})
    bits = claimed.update.counter_bits
    with pytest.raises(CheckpointError, match=rf"t_accum holds torch.u?int8 flip counters, but the checkpoint's "
                                              rf"config says update.counter_bits={bits}"):
        load(tmp_path / "other.safetensors")


def test_save_refuses_counters_of_another_width(nibble_state, trained, tmp_path):
    with pytest.raises(ValueError, match="flip counters are 8-bit.*asks for 4-bit"):
        save(trained, tmp_path / "a.safetensors", NIBBLES)
    with pytest.raises(ValueError, match="flip counters are 4-bit.*asks for 8-bit"):
        save(nibble_state, tmp_path / "b.safetensors", CFG)
    assert os.listdir(tmp_path) == []


def test_save_refuses_an_invalid_state(trained, tmp_path):
    head = trained.params["head"]
    packed = head.packed.clone()
    packed[0, 0] = 250
    bad = State({**trained.params, "head": dataclasses.replace(head, packed=packed)}, trained.step, trained.config)
    with pytest.raises(ValueError, match="invalid byte"):
        save(bad, tmp_path / "bad.safetensors", CFG)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- atomic write


def test_save_leaves_no_temp_files(trained, tmp_path):
    save(trained, tmp_path / "a.safetensors", CFG)
    save(trained, tmp_path / "a.safetensors", CFG)  # overwrite
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_failed_save_keeps_the_previous_file(trained, saved, monkeypatch):
    before = saved.read_bytes()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # midway: a partial file on disk
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    fresh = init_model(CFG, torch.Generator().manual_seed(1))
    with pytest.raises(OSError, match="disk full"):
        save(fresh, saved, CFG)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name], "the temp file must be removed"
    monkeypatch.undo()
    assert int(load(saved).step) == 3


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path)  # a folder is not a checkpoint


def test_truncated_file(saved):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load(saved)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 40, bytes(range(256)) * 8])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load(path)


@pytest.mark.parametrize("where", [0.5, -1])
def test_flipped_byte_in_tensor_data(saved, where):
    raw = bytearray(saved.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header
    pos = len(raw) - 1 if where == -1 else start + int((len(raw) - start) * where)
    raw[pos] ^= 0x01  # stays a plausible value: without the digest this would load silently
    saved.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted.*SHA-256"):
        load(saved)


def test_wrong_format_tag(saved):
    t, meta = read_raw(saved)
    write_raw(saved, t, {**meta, "format": "other-format-9"})
    with pytest.raises(CheckpointError, match="not an arbfn checkpoint.*other-format-9"):
        load(saved)
    write_raw(saved, t, {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(CheckpointError, match="not an arbfn checkpoint"):
        load(saved)


def test_unreadable_config(saved):
    t, meta = read_raw(saved)
    cfg = json.loads(meta["config"])
    cfg["model"]["bogus"] = 1
    write_raw(saved, t, {**meta, "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="unreadable config"):
        load(saved)


def test_missing_tensor(saved):
    t, meta = read_raw(saved)
    del t["params.blocks.0.attn.q.t_accum"]
    write_raw(saved, t, meta)
    with pytest.raises(CheckpointError, match=r"do not match.*missing: \['params.blocks.0.attn.q.t_accum'\]"):
        load(saved)


def test_unexpected_tensor(saved):
    t, meta = read_raw(saved)
    t["params.extra"] = torch.zeros(3)
    write_raw(saved, t, meta)
    with pytest.raises(CheckpointError, match=r"unexpected: \['params.extra'\]"):
        load(saved)


@pytest.mark.parametrize("change,match", [
    (lambda x: x[:, :-1].contiguous(), r"params.head.exp is torch.int8 \(297, 1\), expected torch.int8 \(297, 2\)"),
    (lambda x: x.to(torch.int16), r"params.head.exp is torch.int16 \(297, 2\), expected torch.int8"),
])
def test_wrong_shape_or_dtype(saved, change, match):
    t, meta = read_raw(saved)
    t["params.head.exp"] = change(t["params.head.exp"])
    write_raw(saved, t, meta)
    with pytest.raises(CheckpointError, match=match):
        load(saved)


def test_invalid_packed_byte_with_a_correct_digest(saved):
    t, meta = read_raw(saved)
    t["params.blocks.1.mlp.down.packed"][3, 7] = 250
    write_raw(saved, t, meta)  # a correct SHA-256: only the byte validation can catch it
    _, stored = read_raw(saved)
    assert stored["sha256"] == _digest(read_raw(saved)[0])
    with pytest.raises(CheckpointError, match=r"invalid byte.*\[3, 7\] = 250"):
        load(saved)


def test_nonzero_padding_trit_with_a_correct_digest(saved):
    t, meta = read_raw(saved)
    # d_embed = 64 = 12 * 5 + 4: the last byte of a row holds one padding trit; digit 0 there is a -1 trit
    t["params.text.embed.packed"][0, -1] = 0
    write_raw(saved, t, meta)
    with pytest.raises(CheckpointError, match="pad"):
        load(saved)
