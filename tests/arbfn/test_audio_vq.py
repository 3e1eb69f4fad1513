"""Tests of arbfn.layers.audio_vq: the ternary AudioVQEncoder (convs -> proj -> VQ codebook -> out_proj)."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

from arbfn.layers.audio_vq import (AUDIO_VQ_DEFAULT, SMOKE_SAMPLES, AudioVQConfig, audio_vq, init_audio_vq,
                                   init_audio_vq_default)
from arbfn.layers.vq import update_vq_counters
from arbfn.ternary import attach_probes, decode, linear, make_probes, weights

INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
SMALL = AudioVQConfig(channels=(4, 6), kernel_sizes=(4, 3), strides=(2, 3), code_dim=5, n_codes=7, n_tokens=11)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def params():
    return init_audio_vq_default(32, gen(0))


def small_params(seed: int = 0):
    return init_audio_vq(**dataclasses.asdict(SMALL), group_size=4, generator=gen(seed))


def test_smoke_shapes(params):
    audio = torch.randn(1, SMOKE_SAMPLES, generator=gen(1))
    logits, indices, commitment = audio_vq(params, audio)
    assert logits.shape == (1, 4, 289) and logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    assert indices.shape == (1, 4) and indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < AUDIO_VQ_DEFAULT.n_codes)).all())
    assert commitment.shape == () and bool(torch.isfinite(commitment))
    logits3, indices3, _ = audio_vq(params, audio.unsqueeze(1))
    assert torch.equal(logits3, logits) and torch.equal(indices3, indices)


@pytest.mark.parametrize("b,samples", [(2, 2000), (3, 400), (1, 1999)])
def test_frames_follow_the_hop(params, b, samples):
    logits, indices, _ = audio_vq(params, torch.randn(b, samples, generator=gen(2)))
    frames = AUDIO_VQ_DEFAULT.frames(samples)
    assert AUDIO_VQ_DEFAULT.hop == 400 and frames == samples // 400
    assert logits.shape == (b, frames, 289) and indices.shape == (b, frames)


def test_default_weight_count_and_structure(params):
    ws = weights(params)
    assert len(ws) == 7  # 4 convs, proj, codebook, out_proj
    assert sum(w.num_weights for w in ws) == 402_752  # the original: 404,864
    assert [w.num_weights for w in ws] == [288, 16_384, 65_536, 294_912, 8_192, 8_192, 9_248]
    assert (params["codebook"].out_features, params["codebook"].in_features) == (256, 32)
    assert (params["out_proj"].out_features, params["out_proj"].in_features) == (289, 32)
    meta = init_audio_vq_default(32, None)
    assert sum(w.num_weights for w in weights(meta)) == 402_752


def test_no_float_state_and_meta_and_determinism(params):
    leaves = pytree.tree_flatten_with_path(params)[0]
    bad = [(pytree.keystr(k), v.dtype) for k, v in leaves
           if isinstance(v, torch.Tensor) and v.dtype not in INTEGER_DTYPES]
    assert bad == [] and params["usage"].dtype == torch.int16 and params["usage"].shape == (256,)
    assert all(t.is_meta for t in pytree.tree_leaves(init_audio_vq_default(32, None)) if isinstance(t, torch.Tensor))
    a, b = small_params(3), small_params(3)
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        assert not isinstance(x, torch.Tensor) or torch.equal(x, y)


def test_logits_are_out_proj_of_the_chosen_codes():
    p = small_params()
    logits, indices, _ = audio_vq(p, torch.randn(2, 30, generator=gen(4)), SMALL)
    assert indices.shape == (2, SMALL.frames(30)) == (2, 5)
    codes = decode(p["codebook"])[indices]
    assert torch.allclose(logits, linear(p["out_proj"], codes), atol=1e-5)
    q = update_vq_counters(p, indices)
    assert int(q["usage"].sum()) == indices.numel() and set(q) == set(p)


def test_gradients_reach_every_probe():
    p = small_params()
    audio = torch.randn(2, 30, generator=gen(5))
    leaves, spec = pytree.tree_flatten(make_probes(p))
    live = [i for i, leaf in enumerate(leaves) if leaf is not None]

    def loss(live_leaves):
        full = list(leaves)
        for i, leaf in zip(live, live_leaves):
            full[i] = leaf
        logits, _, commitment = audio_vq(attach_probes(p, pytree.tree_unflatten(full, spec)), audio, SMALL)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), torch.arange(10) % 11) + commitment

    grads = torch.func.grad(loss)([leaves[i] for i in live])
    assert len(grads) == len(weights(p)) == 5
    for g, w in zip(grads, weights(p)):
        assert g.shape == (w.out_features, w.in_features) and bool(g.abs().sum() > 0)


def test_errors():
    p = small_params()
    with pytest.raises(TypeError, match="floating"):
        audio_vq(p, torch.ones(1, 30, dtype=torch.int16), SMALL)
    with pytest.raises(ValueError, match=r"\[B, 1, samples\]"):
        audio_vq(p, torch.randn(1, 2, 30), SMALL)
    with pytest.raises(ValueError, match=r"\[B, 1, samples\]"):
        audio_vq(p, torch.randn(30), SMALL)
    with pytest.raises(ValueError, match="too short"):
        audio_vq(p, torch.randn(1, 3), SMALL)
    with pytest.raises(ValueError, match="conv blocks"):
        audio_vq(p, torch.randn(1, 1600))  # default config has 4 blocks, these params 2
    with pytest.raises(ValueError, match="one channel count"):
        init_audio_vq((4, 6), (4,), (2, 3), 5, 7, 11, 4, gen(0))
    with pytest.raises(ValueError, match="stride"):
        init_audio_vq((4,), (2,), (3,), 5, 7, 11, 4, gen(0))
    with pytest.raises(ValueError, match="positive"):
        init_audio_vq((4,), (2,), (2,), 5, 0, 11, 4, gen(0))

