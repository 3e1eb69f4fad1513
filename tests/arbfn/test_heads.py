"""Tests of arbfn.layers.heads: OutputRouter, VideoHead (denoise loop, loss) and TalkerHead."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from arbfn.layers.heads import (HEADS, cosine_alphas, init_output_router, init_talker_head, init_video_head,
                                output_router, predict_noise, talker_head, video_denoise_step, video_head,
                                video_loss)
from arbfn.loops import act_fixed
from arbfn.ternary import attach_probes, decode, is_ternary, linear, make_probes

D, GS, STEPS = 32, 16, 5
LATENT = (16, 1, 32, 32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def all_params(generator):
    return {"router": init_output_router(D, GS, generator), "video": init_video_head(D, STEPS, GS, generator),
            "talker": init_talker_head(D, GS, generator)}


def tensor_leaves(tree) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def inputs(b: int = 2, t: int = 5, seed: int = 1):
    g = gen(seed)
    return torch.randn(b, t, D, generator=g), torch.randn(b, *LATENT, generator=g)


@pytest.fixture(scope="module")
def params():
    return all_params(gen(0))


def grads_of(loss_fn, p):
    """dL/dW for every ternary weight of ``p`` (a tree of probes' gradients)."""
    return torch.func.grad(lambda probes: loss_fn(attach_probes(p, probes)))(make_probes(p))


def test_shapes_dtypes_and_router_weights(params):
    cond, latent = inputs()
    assert HEADS == ("byte", "video", "talker")
    w = output_router(params["router"], cond)
    assert w.shape == (2, 5, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(w, torch.softmax(linear(params["router"]["w"], cond), -1))
    out, aux = video_head(params["video"], cond, latent, STEPS)
    assert out.shape == latent.shape and out.dtype == torch.float32
    assert aux["steps"].shape == (2,) and aux["steps"].dtype == torch.int64 and aux["ponder"].shape == (2,)
    logits, tokens = talker_head(params["talker"], cond, 3, 11)
    assert logits.shape == (2, 11, 289) and tokens.shape == (2, 11) and tokens.dtype == torch.int64
    assert params["talker"]["head"].out_features == 289 and params["video"]["noise_embed"].out_features == STEPS


def test_no_float_params_meta_init_and_determinism():
    a, b = all_params(gen(3)), all_params(gen(3))
    leaves = tensor_leaves(a)
    assert leaves and all(not x.is_floating_point() for x in leaves)
    assert all(torch.equal(x, y) for x, y in zip(leaves, tensor_leaves(b)))
    assert any(not torch.equal(x, y) for x, y in zip(leaves, tensor_leaves(all_params(gen(4)))))
    meta = all_params(None)
    assert pytree.tree_structure(meta) == pytree.tree_structure(a)
    for x, y in zip(tensor_leaves(meta), leaves):
        assert x.is_meta and x.shape == y.shape and x.dtype == y.dtype


def test_cosine_schedule_matches_formula():
    a32 = cosine_alphas(8)
    a = a32.double()
    f = [math.cos((t / 8 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(9)]
    assert a32.dtype == torch.float32 and a32.shape == (8,) and bool(((a > 0) & (a <= 1)).all())
    for s in range(7):  # the last step is clipped at 0.001
        assert abs(float(torch.prod(a[: s + 1])) - f[s + 1] / f[0]) < 1e-5
    assert float(a[-1]) == pytest.approx(0.001) and bool((a[1:] <= a[:-1]).all())


def test_denoise_step_uses_reverse_schedule_row_and_formula(params):
    cond, latent = inputs()
    p, alphas = params["video"], cosine_alphas(STEPS)
    for i in (0, 2, STEPS - 1):
        s = STEPS - 1 - i
        nxt, p_halt = video_denoise_step(p, i, latent, cond, alphas)
        pred, want_halt = predict_noise(p, latent, cond, torch.full((2,), s))
        a = alphas[s]
        torch.testing.assert_close(nxt, (latent - (1 - a) * pred) / a.sqrt(), rtol=1e-5, atol=1e-5)
        assert torch.equal(p_halt, want_halt) and p_halt.shape == (2,)
        assert bool(((p_halt > 0) & (p_halt < 1)).all())


def float64_denoiser(p, latent: torch.Tensor, cond: torch.Tensor, step: torch.Tensor):
    """Independent oracle of predict_noise: dense float64 weights, unfold/fold patches, explicit attention."""
    w = {k: decode(v).double() for k, v in p.items()}
    size = latent.shape[-1]
    tokens = F.unfold(latent.double()[:, :, 0], 4, stride=4).transpose(1, 2)
    h = tokens @ w["in_proj"].T + w["noise_embed"][step][:, None]
    q, k, v = h @ w["q"].T, cond.double() @ w["k"].T, cond.double() @ w["v"].T
    h = h + torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v @ w["o"].T
    out = F.fold((h @ w["out_proj"].T).transpose(1, 2), (size, size), 4, stride=4)[:, :, None]
    return out, torch.sigmoid(h.mean(1) @ w["halt"].T)[:, 0]


def test_predict_noise_matches_float64_oracle_and_head_is_act_over_steps(params):
    cond, latent = inputs(seed=11)
    p, step = params["video"], torch.tensor([0, 3])
    pred, p_halt = predict_noise(p, latent, cond, step)
    want, want_halt = float64_denoiser(p, latent, cond, step)
    torch.testing.assert_close(pred.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_halt.double(), want_halt, rtol=1e-5, atol=1e-6)
    out, aux = video_head(p, cond, latent, STEPS)
    res = act_fixed(lambda i, x: video_denoise_step(p, i, x, cond, cosine_alphas(STEPS)), latent, STEPS, 0.99)
    assert torch.equal(out, res.output) and torch.equal(aux["ponder"], res.ponder)
    assert torch.equal(aux["steps"], res.steps)


@pytest.mark.parametrize("threshold,steps", [(0.99, STEPS), (0.5, STEPS), (0.01, STEPS), (0.99, 2), (1.0, 3)])
def test_video_head_eager_equals_fixed(params, threshold, steps):
    cond, latent = inputs(b=3, seed=int(threshold * 100) + steps)
    eager, aux_e = video_head(params["video"], cond, latent, steps, threshold)
    fixed, aux_f = video_head(params["video"], cond, latent, steps, threshold, fixed=True)
    assert torch.equal(eager, fixed)
    assert torch.equal(aux_e["steps"], aux_f["steps"]) and torch.equal(aux_e["ponder"], aux_f["ponder"])
    if threshold == 0.01:
        assert int(aux_e["steps"].max()) < steps, "this case must exercise the early exit"
    if threshold == 0.5:
        assert len(set(aux_e["steps"].tolist())) > 1, "this case must halt items at different steps"


def test_video_head_gradients_reach_every_probe(params):
    cond, latent = inputs(seed=5)
    p = params["video"]
    _, aux = video_head(p, cond, latent, STEPS)
    assert int(aux["steps"].min()) >= 2, "halt only gets a gradient when an item takes more than one step"
    upstream = torch.randn(latent.shape, generator=gen(6))
    g = grads_of(lambda q: (video_head(q, cond, latent, STEPS)[0] * upstream).sum()
                 + video_head(q, cond, latent, STEPS)[1]["ponder"].sum(), p)
    for name, grad in g.items():
        assert grad.abs().sum() > 0, name
    used = STEPS - int(aux["steps"].max())  # rows STEPS-1 down to this one were used
    row_norms = g["noise_embed"].abs().sum(1)
    assert bool((row_norms[used:] > 0).all()) and bool((row_norms[:used] == 0).all())


def test_video_loss_is_noise_mse_and_trains_the_denoiser(params):
    cond, clean = inputs(seed=7)
    noise = torch.randn(clean.shape, generator=gen(8))
    p = params["video"]
    step = torch.tensor([1, 3])
    abar = torch.cumprod(cosine_alphas(STEPS), 0)[step].view(2, 1, 1, 1, 1)
    noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
    want = F.mse_loss(predict_noise(p, noisy, cond, step)[0], noise)
    assert torch.equal(video_loss(p, cond, clean, noise, step), want)
    int_step = video_loss(p, cond, clean, noise, 2)
    assert torch.equal(int_step, video_loss(p, cond, clean, noise, torch.tensor([2, 2])))
    g = grads_of(lambda q: video_loss(q, cond, clean, noise, step), p)
    for name in ("in_proj", "q", "k", "v", "o", "out_proj"):
        assert g[name].abs().sum() > 0, name
    assert torch.equal(g["halt"], torch.zeros_like(g["halt"])), "the loss does not involve halting"
    rows = g["noise_embed"].abs().sum(1)
    assert bool((rows[step] > 0).all()) and int((rows > 0).sum()) == 2


def test_router_and_talker_gradients(params):
    cond, _ = inputs(seed=9)
    g = grads_of(lambda q: (output_router(q["router"], cond)[..., 1].sum()
                            + talker_head(q["talker"], cond, 2, 7)[0].square().sum()), params)
    assert g["router"]["w"].abs().sum() > 0 and g["talker"]["head"].abs().sum() > 0
    assert g["video"]["q"] is not None and g["video"]["q"].abs().sum() == 0


def nested_talker(head, cond: torch.Tensor, stride: int, target_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's definition: for each token, for each stride step, argmax of head(state); stop at
    target_len; past the last token keep emitting from the last state."""
    logits = []
    for t in range(cond.shape[1]):
        for _ in range(stride):
            if len(logits) < target_len:
                logits.append(linear(head, cond[:, t]))
    while len(logits) < target_len:
        logits.append(linear(head, cond[:, -1]))
    out = torch.stack(logits, dim=1)
    return out, torch.stack([x.argmax(-1) for x in logits], dim=1)


@settings(max_examples=30)
@given(b=st.sampled_from((1, 2, 3)), t=st.sampled_from((1, 2, 5, 7)), stride=st.sampled_from((1, 2, 3, 5)),
       extra=st.integers(-6, 6), seed=st.integers(0, 2**16))
def test_talker_equals_nested_loop(b, t, stride, extra, seed):
    target_len = max(1, t * stride + extra)  # shorter than, equal to and longer than T * stride
    p = init_talker_head(D, GS, gen(seed), n_tokens=17)
    cond = torch.randint(-3, 4, (b, t, D), generator=gen(seed + 1)).float()  # small ints: exact fp32 logits
    logits, tokens = talker_head(p, cond, stride, target_len)
    want_logits, want_tokens = nested_talker(p["head"], cond, stride, target_len)
    assert logits.shape == (b, target_len, 17)
    assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)


def test_bad_inputs_raise(params):
    cond, latent = inputs()
    v = params["video"]
    with pytest.raises(ValueError, match="latent"):
        video_head(v, cond, latent[:, :8], STEPS)
    with pytest.raises(ValueError, match="latent"):
        video_head(v, cond, latent[..., :30], STEPS)
    with pytest.raises(ValueError, match="cond"):
        video_head(v, cond[..., :8], latent, STEPS)
    with pytest.raises(ValueError, match="batch"):
        video_head(v, cond[:1], latent, STEPS)
    with pytest.raises(ValueError, match="max_steps"):
        video_head(v, cond, latent, STEPS + 1)
    with pytest.raises(ValueError, match="step"):
        video_loss(v, cond, latent, latent, STEPS)
    with pytest.raises(TypeError, match="step"):
        video_loss(v, cond, latent, latent, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="noise"):
        video_loss(v, cond, latent, latent[:1], 0)
    with pytest.raises(ValueError, match="size"):
        init_video_head(D, STEPS, GS, None, patch=5)
    with pytest.raises(ValueError, match="max_steps"):
        init_video_head(D, 0, GS, None)
    with pytest.raises(ValueError, match="stride"):
        talker_head(params["talker"], cond, 0, 4)
    with pytest.raises(ValueError, match="target_len"):
        talker_head(params["talker"], cond, 2, 0)
    with pytest.raises(ValueError, match="cond"):
        talker_head(params["talker"], cond[:, :0], 2, 4)
    with pytest.raises(ValueError, match="output_router"):
        output_router(params["router"], cond[0])
    assert not any(is_ternary(x) and x.probe is not None for x in pytree.tree_leaves(params, is_leaf=is_ternary))
