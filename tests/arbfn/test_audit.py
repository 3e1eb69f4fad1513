"""Tests of arbfn.audit: counts of ternary weights and state bytes, and detection of float tensors."""

import dataclasses
import json

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from arbfn.audit import AuditError, audit, format_audit
from arbfn.config import ModelConfig, UpdateConfig, preset
from arbfn.model import State, init_model
from arbfn.ternary import init_ternary, set_flip_counters, weights

TINY = preset("tiny")
KEYS = {"ternary_weights", "state_bytes", "bytes_per_weight", "trainable_float_params", "frozen_float_params",
        "float_buffers", "sidecars"}


@pytest.fixture(scope="module")
def state() -> State:
    return init_model(TINY, torch.Generator().manual_seed(0))


TINY_WEIGHTS = 294_368  # measured once; pins the tiny preset's shape
BYTE_PATH = ("text", "blocks", "norm", "head")


def expected_weights(m: ModelConfig) -> int:
    """Logical ternary weights of the byte path (text, blocks, final norm, byte head), from the config alone."""
    text = m.vocab_size * m.d_embed + m.d_model * m.window * m.d_embed
    block = 4 * m.d_model * m.d_model + 2 * m.d_model * m.d_ff + 2 * m.d_model
    return text + m.n_layers * block + m.d_model + m.vocab_size * m.d_model


def test_tiny_counts(state):
    r = audit(state)
    assert r["ternary_weights"] == sum(w.out_features * w.in_features for w in weights(state.params))
    assert r["ternary_weights"] == TINY_WEIGHTS
    assert sum(r["areas"][a]["ternary_weights"] for a in BYTE_PATH) == expected_weights(TINY.model)
    nbytes = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor))
    assert r["state_bytes"] == nbytes
    assert r["state_mb"] == pytest.approx(nbytes / 1e6)
    assert r["bytes_per_weight"] == pytest.approx(nbytes / r["ternary_weights"])
    # packed trits 1/5 + int8 t_accum 1 + int8 exp and e_accum 2/32, plus row padding (~1.26), plus the
    # integer counters (VQ usage, graph edges, memory strength): 1.31 for tiny
    assert 1.2 <= r["bytes_per_weight"] <= 1.35
    assert r["trainable_float_params"] == 0 and r["frozen_float_params"] == 0 and r["float_buffers"] == 0
    assert r["sidecars"] == {}
    assert set(r["areas"]) == {*BYTE_PATH, "memory", "bridge", "vq", "graph", "moe", "router", "video", "talker"}
    assert sum(a["ternary_weights"] for a in r["areas"].values()) == r["ternary_weights"]
    assert sum(a["state_bytes"] for a in r["areas"].values()) == r["state_bytes"] - 8  # all but the int64 step
    assert r["areas"]["head"]["ternary_weights"] == 297 * 64
    audit(state, strict=True)  # a clean state passes the strict audit


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_stochastic_flip_layout_is_under_0_35_bytes_per_weight(name):
    """Without per-weight flip counters (UpdateConfig.flip_mode "stochastic") the state drops exactly 1 byte per
    weight: trits 1/5 + exp and e_accum 2/32 + padding and counters, 0.31 for tiny, 0.28 for small."""
    full = init_model(preset(name))  # shape-only
    slim = set_flip_counters(full, False)
    a, b = audit(full), audit(slim)
    assert b["ternary_weights"] == a["ternary_weights"]
    assert b["state_bytes"] == a["state_bytes"] - a["ternary_weights"]
    assert 0.25 <= b["bytes_per_weight"] <= 0.35


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_four_bit_counters_count_half_a_byte_per_weight(name):
    """4-bit flip counters (UpdateConfig.counter_bits 4) hold ceil(K/2) bytes per row of K weights where int8 ones hold
    K: the audit counts exactly that difference (an odd K rounds up), about 0.5 bytes/weight less."""
    cfg = preset(name)
    full = init_model(cfg)  # shape-only
    narrow = init_model(dataclasses.replace(cfg, update=UpdateConfig(flip_threshold=7, counter_bits=4)))
    a, b = audit(full), audit(narrow)
    saved = sum(w.out_features * (w.in_features - (w.in_features + 1) // 2) for w in weights(full.params)
                if w.t_accum is not None)
    assert b["ternary_weights"] == a["ternary_weights"]
    assert b["state_bytes"] == a["state_bytes"] - saved
    assert a["bytes_per_weight"] - 0.5 <= b["bytes_per_weight"] <= a["bytes_per_weight"] - 0.49


def test_four_bit_counters_of_an_odd_width_round_up():
    w = set_flip_counters(set_flip_counters(init_ternary(3, 7, 4, torch.Generator().manual_seed(0)), False), True, 4)
    r = audit(State({"w": w}, torch.tensor(0), ModelConfig()))
    # packed 3 x 2, exp and e_accum 3 x 2 each, counters 3 x ceil(7/2), the int64 step
    assert r["state_bytes"] == 6 + 6 + 6 + 12 + 8 and r["ternary_weights"] == 21


def test_json_keys(state):
    r = json.loads(json.dumps(audit(state)))
    assert KEYS <= set(r)
    assert isinstance(r["ternary_weights"], int) and isinstance(r["state_bytes"], int)


class RealTensorOps(TorchDispatchMode):
    """Records every op that produces a tensor with storage (not on the meta device)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and not t.is_meta for t in pytree.tree_leaves(out)):
            self.ops.append(str(func))
        return out


def test_meta_state_is_counted_without_allocating(state):
    meta = init_model(TINY)
    assert all(t.is_meta for t in pytree.tree_leaves(meta) if isinstance(t, torch.Tensor))
    with RealTensorOps() as rec:
        r = audit(meta)
    assert rec.ops == [], "auditing a meta state must not create real tensors"
    assert r == audit(state)
    # a model far too large to allocate here (~25e9 weights, ~32 GB of state) is counted from shapes alone
    big = ModelConfig(d_embed=1024, d_model=8192, n_layers=32, n_heads=64, d_ff=32768, max_context=4096, group_size=64)
    with RealTensorOps() as rec:
        r = audit(init_model(big))
    assert rec.ops == [], "building and auditing a shape-only state must not create real tensors"
    assert sum(r["areas"][a]["ternary_weights"] for a in BYTE_PATH) == expected_weights(big)
    assert r["ternary_weights"] > 2.5e10 and 1.2 <= r["bytes_per_weight"] <= 1.35
    assert r["trainable_float_params"] == 0


def test_injected_float_param_is_reported(state):
    params = {**state.params, "extra_gain": torch.ones(64)}
    bad = State(params, state.step, state.config)
    r = audit(bad)
    assert r["trainable_float_params"] == 64
    with pytest.raises(AuditError, match="float tensors in the core state: 64 float params"):
        audit(bad, strict=True)
    # a float tensor inside a ternary weight is found too
    head = state.params["head"]
    bad = State({**state.params, "head": dataclasses.replace(head, exp=head.exp.float())}, state.step, state.config)
    assert audit(bad)["trainable_float_params"] == head.exp.numel()
    assert audit(bad)["areas"]["head"]["trainable_float_params"] == head.exp.numel()
    with pytest.raises(AuditError):
        audit(bad, strict=True)


def test_float_buffer_is_reported(state):
    bad = State(state.params, state.step.double(), state.config)
    r = audit(bad)
    assert r["float_buffers"] == 1 and r["trainable_float_params"] == 0
    with pytest.raises(AuditError, match="1 float buffer"):
        audit(bad, strict=True)


def test_format_audit_table(state):
    text = format_audit(audit(state))
    assert "TOTAL" in text and f"{TINY_WEIGHTS:,}" in text and "sidecars: 0" in text
    for area in ("text", "blocks", "norm", "head"):
        assert area in text
