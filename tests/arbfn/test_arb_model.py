"""The assembled ARB model: switches, presets (tiny, small, 3b), the multimodal heads in the train step,
integer counter learning, and bad inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from arbfn import data
from arbfn.audit import audit
from arbfn.config import ModelConfig, UpdateConfig, preset
from arbfn.model import forward, init_model
from arbfn.ternary import weights
from arbfn.train import train_step

TINY = preset("tiny")
LOW = dataclasses.replace(TINY, update=UpdateConfig(flip_threshold=1, exp_threshold=1))  # everything moves


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return data.sample_batch(data.load_corpus(), 4, 32, gen(1))


def video_batch(ids: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    g, b = gen(seed), ids.shape[0]
    return {"bytes": ids, "video_latent": torch.randn(b, 16, 1, 32, 32, generator=g),
            "video_noise": torch.randn(b, 16, 1, 32, 32, generator=g),
            "video_step": torch.randint(0, TINY.model.heads.video_max_steps, (b,), generator=g),
            "audio_tokens": torch.randint(0, 289, (b, 40), generator=g)}


@pytest.mark.parametrize("flags, areas", [
    ({}, set()),
    ({"enable_memory": True}, {"memory"}),
    ({"enable_vq": True}, {"bridge", "vq"}),
    ({"enable_vq": True, "enable_graph": True}, {"bridge", "vq", "graph"}),
    ({"enable_moe": True}, {"moe"}),
])
def test_switches_choose_the_components(flags, areas, ids):
    m = ModelConfig(**flags)
    state = init_model(m, gen(0))
    always = {"text", "blocks", "norm", "router", "head", "video", "talker"}
    assert set(state.params) == always | areas
    out = forward(state, ids)
    assert out.logits.shape == (4, 32, 297) and out.router.shape == (4, 32, 3) and out.hidden.shape == (4, 32, 64)
    assert ("vq_indices" in out.aux) == ("vq" in areas) and ("graph_ponder" in out.aux) == ("graph" in areas)


def test_impossible_switches_name_the_missing_piece():
    with pytest.raises(ValueError, match="enable_graph needs enable_vq"):
        ModelConfig(enable_graph=True)


def test_fixed_step_loops_give_the_same_forward(ids):
    state = init_model(TINY, gen(0))
    eager, fixed = forward(state, ids), forward(state, ids, fixed_loops=True)
    assert torch.allclose(eager.logits, fixed.logits, atol=1e-5)
    assert torch.equal(eager.aux["vq_indices"], fixed.aux["vq_indices"])


def test_multimodal_batch_trains_the_video_and_talker_heads(ids):
    state = init_model(LOW, gen(0))
    new, m = train_step(state, video_batch(ids), LOW)
    assert {"video_loss", "talker_loss"} <= set(m) and all(torch.isfinite(v) for v in m.values())
    for head in ("video", "talker"):
        before = {id(w): w for w in weights(state.params[head])}
        moved = [not torch.equal(a.packed, b.packed) or not torch.equal(a.t_accum, b.t_accum)
                 for a, b in zip(weights(new.params[head]), before.values())]
        assert any(moved), f"the {head} head did not learn from its targets"
    text_only, m2 = train_step(state, ids, LOW)
    assert "video_loss" not in m2
    assert all(torch.equal(a.t_accum, b.t_accum)
               for a, b in zip(weights(text_only.params["talker"]), weights(state.params["talker"])))


def test_counters_learn_from_what_the_forward_saw(ids):
    state = init_model(TINY, gen(0))
    new, _ = train_step(state, ids, TINY)
    indices = forward(state, ids).aux["vq_indices"]
    usage = torch.zeros_like(new.params["vq"]["usage"])
    touched = indices.unique()
    assert bool((new.params["vq"]["usage"][touched] >= 1).all())
    assert int(new.params["vq"]["usage"].sum()) >= touched.numel() and not torch.equal(new.params["vq"]["usage"], usage)
    assert not torch.equal(new.params["graph"]["score"], state.params["graph"]["score"])
    assert not torch.equal(new.params["memory"]["memgram"]["strength"], state.params["memory"]["memgram"]["strength"])


@pytest.mark.parametrize("bad, match", [
    ({"video_latent": "nan"}, "batch\\['video_latent'\\] holds NaN"),
    ({"video_step": None}, "video training needs video_latent, video_noise and video_step together"),
    ({"colour": torch.zeros(1)}, "unknown batch keys"),
])
def test_bad_multimodal_batches(bad, match, ids):
    batch = video_batch(ids)
    for k, v in bad.items():
        if v is None:
            batch.pop(k)
        elif v == "nan":
            batch[k] = batch[k].clone()
            batch[k][0, 0, 0, 0, 0] = float("nan")
        else:
            batch[k] = v
    with pytest.raises(ValueError, match=match):
        train_step(init_model(TINY, gen(0)), batch, TINY)


def test_small_preset_train_step_runs_and_changes_state():
    cfg = dataclasses.replace(preset("small"), update=UpdateConfig(flip_threshold=1, exp_threshold=1))
    state = init_model(cfg, gen(0))
    a = audit(state, strict=True)
    assert 38e6 <= a["ternary_weights"] <= 44e6  # the seeds' small model: 41,087,552
    b = data.sample_batch(data.load_corpus(), 2, 32, gen(2))
    new, m = train_step(state, b, cfg)
    assert torch.isfinite(m["loss"]) and int(m["flips"]) > 0 and int(new.step) == 1


class RealTensorOps(TorchDispatchMode):
    """Counts ops that produce a tensor with storage."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += any(isinstance(t, torch.Tensor) and not t.is_meta for t in pytree.tree_leaves(out))
        return out


def test_3b_preset_is_counted_without_allocating():
    with RealTensorOps() as rec:
        a = audit(init_model(preset("3b")), strict=True)
    assert rec.count == 0
    assert 2.5e9 <= a["ternary_weights"] <= 3.5e9
    assert a["areas"]["vq"]["ternary_weights"] >= 640_000_000  # 10M codes x 64
    assert a["trainable_float_params"] == a["float_buffers"] == 0
