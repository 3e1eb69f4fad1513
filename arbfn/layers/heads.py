"""Output heads: the OutputRouter over (byte, video, talker), the VideoHead denoiser and the TalkerHead.

VideoHead choices (SYSTEM.md leaves them open):

- Schedule: per-step ``alphas[s]`` from the cosine schedule (Nichol & Dhariwal 2021) over ``S`` steps,
  ``alpha_bar(t) = cos²((t/S + 0.008)/1.008 · π/2)`` normalised to 1 at t=0, ``alphas[s] = alpha_bar(s+1) /
  alpha_bar(s)`` clipped to [0.001, 1]. It is a fixed function of ``S`` (no parameter, no gradient).
- The denoise loop runs from the noisiest schedule step down: loop iteration ``i`` uses schedule step
  ``s = S - 1 - i`` (its ``noise_embed`` row and ``alphas[s]``) and applies ``kernels.denoise``.
- Training uses :func:`video_loss`: one denoiser call on ``sqrt(abar_s)·clean + sqrt(1-abar_s)·noise``
  (``abar_s = prod(alphas[:s+1])`` of the table's full schedule) predicting ``noise``, MSE. The ACT loop
  itself is for generation (its halting projection learns through the ponder cost when trained).
- The denoiser: patchify ``patch×patch`` → tokens of ``channels·patch²`` → in-proj to d_model +
  ``noise_embed[s]`` → one single-head cross-attention (q from latent tokens, k/v from the conditioning)
  as a residual → out-proj → unpatchify. Halting: ``sigmoid(halt(mean of tokens))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from arbfn.checking import checking_data
from arbfn.loops import act_eager, act_fixed
from arbfn.ternary import TernaryWeight, embed, init_ternary, linear
from kernels.denoise import denoise_step

HEADS = ("byte", "video", "talker")
TALKER_TOKENS = 289


# ---------------------------------------------------------------- router


def init_output_router(d_model: int, group_size: int, generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """One [len(HEADS), d_model] projection scoring the heads."""
    return {"w": init_ternary(len(HEADS), d_model, group_size, generator)}


def output_router(p: dict[str, TernaryWeight], x: torch.Tensor) -> torch.Tensor:
    """x [B, T, d] -> softmax weights [B, T, 3] over ``HEADS`` per position."""
    _check_states(x, p["w"].in_features, "output_router")
    return torch.softmax(linear(p["w"], x), dim=-1)


# ---------------------------------------------------------------- video head


def init_video_head(d_model: int, max_steps: int, group_size: int, generator: torch.Generator | None,
                    patch: int = 4, channels: int = 16, size: int = 32) -> dict[str, TernaryWeight]:
    """Noise-step table [max_steps, d_model], denoiser projections and the halting projection [1, d_model]."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if patch < 1 or channels < 1 or size < 1 or size % patch:
        raise ValueError(f"size ({size}) must be a positive multiple of patch ({patch}); channels={channels}")
    tok = channels * patch * patch
    sq = {n: init_ternary(d_model, d_model, group_size, generator) for n in ("q", "k", "v", "o")}
    return {"noise_embed": init_ternary(max_steps, d_model, group_size, generator, exponent=0),
            "in_proj": init_ternary(d_model, tok, group_size, generator),
            **sq,
            "out_proj": init_ternary(tok, d_model, group_size, generator),
            "halt": init_ternary(1, d_model, group_size, generator)}


def cosine_alphas(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-step alphas [steps] of the cosine schedule (see the module docstring), fp32 in [0.001, 1]."""
    t = torch.arange(steps + 1, dtype=torch.float64, device=device) / steps
    abar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (abar[1:] / abar[:-1]).clamp(0.001, 1.0).to(torch.float32)


def _patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, _, h, w = latent.shape
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _unpatchify(tokens: torch.Tensor, shape: torch.Size, patch: int) -> torch.Tensor:
    b, c, _, h, w = shape
    x = tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(shape)


def _check_video(p: dict[str, TernaryWeight], latent: torch.Tensor, cond: torch.Tensor, patch: int) -> None:
    channels = p["in_proj"].in_features // (patch * patch)
    if channels * patch * patch != p["in_proj"].in_features:
        raise ValueError(f"patch {patch} does not match in_proj width {p['in_proj'].in_features}")
    if latent.dim() != 5 or latent.shape[1] != channels or latent.shape[2] != 1 or latent.shape[3] % patch \
            or latent.shape[4] % patch or not latent.is_floating_point():
        raise ValueError(f"latent must be float (B, {channels}, 1, H, W) with H, W multiples of {patch}, "
                         f"got {latent.dtype} {tuple(latent.shape)}")
    _check_states(cond, p["q"].in_features, "cond")
    if cond.shape[0] != latent.shape[0]:
        raise ValueError(f"cond batch {cond.shape[0]} != latent batch {latent.shape[0]}")


def predict_noise(p: dict[str, TernaryWeight], latent: torch.Tensor, cond: torch.Tensor, step: torch.Tensor,
                  patch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoiser: (predicted noise shaped like ``latent``, halting probability [B]) at schedule ``step`` [B]."""
    b = latent.shape[0]
    h = linear(p["in_proj"], _patchify(latent, patch)) + embed(p["noise_embed"], step)[:, None]
    q = linear(p["q"], h)[:, None]
    k, v = linear(p["k"], cond)[:, None], linear(p["v"], cond)[:, None]
    h = h + linear(p["o"], F.scaled_dot_product_attention(q, k, v)[:, 0])
    pred = _unpatchify(linear(p["out_proj"], h), latent.shape, patch)
    return pred, torch.sigmoid(linear(p["halt"], h.mean(1))).reshape(b)


def video_denoise_step(p: dict[str, TernaryWeight], i: int, latent: torch.Tensor, cond: torch.Tensor,
                       alphas: torch.Tensor, patch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop iteration ``i`` (schedule step ``len(alphas) - 1 - i``): (next latent, halting probability [B])."""
    b, s = latent.shape[0], alphas.shape[0] - 1 - i
    step = torch.full((b,), s, dtype=torch.int64, device=latent.device)
    pred, p_halt = predict_noise(p, latent, cond, step, patch)
    return denoise_step(latent, pred, alphas[s].expand(b)), p_halt


def video_head(p: dict[str, TernaryWeight], cond: torch.Tensor, latent: torch.Tensor, max_steps: int,
               threshold: float = 0.99, fixed: bool = False, patch: int = 4) -> tuple[torch.Tensor, dict[str, Any]]:
    """ACT denoise loop over a ``max_steps`` cosine schedule: (ACT-weighted latent, {"ponder", "steps"} [B])."""
    _check_video(p, latent, cond, patch)
    if not 1 <= max_steps <= p["noise_embed"].out_features:
        raise ValueError(f"max_steps must be in 1..{p['noise_embed'].out_features} (noise_embed rows), got {max_steps}")
    alphas = cosine_alphas(max_steps, latent.device)
    loop = act_fixed if fixed else act_eager
    res = loop(lambda i, x: video_denoise_step(p, i, x, cond, alphas, patch), latent, max_steps, threshold)
    return res.output, {"ponder": res.ponder, "steps": res.steps}


def video_loss(p: dict[str, TernaryWeight], cond: torch.Tensor, clean_latent: torch.Tensor, noise: torch.Tensor,
               step: int | torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Training loss: MSE of the noise predicted from ``clean_latent`` noised to schedule ``step`` (int or [B])."""
    _check_video(p, clean_latent, cond, patch)
    if noise.shape != clean_latent.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match clean_latent {tuple(clean_latent.shape)}")
    b, rows = clean_latent.shape[0], p["noise_embed"].out_features
    if isinstance(step, bool) or not isinstance(step, (int, torch.Tensor)) or \
            (isinstance(step, torch.Tensor) and (step.dtype != torch.int64 or step.shape not in ((), (b,)))):
        raise TypeError(f"step must be an int or an int64 tensor [] or [{b}], got {step!r}")
    step = torch.as_tensor(step, device=clean_latent.device).expand(b)
    if checking_data() and not bool(((step >= 0) & (step < rows)).all()):
        raise ValueError(f"step must lie in 0..{rows - 1}")
    abar = torch.cumprod(cosine_alphas(rows, clean_latent.device), 0)[step].view(b, 1, 1, 1, 1)
    noisy = abar.sqrt() * clean_latent + (1 - abar).sqrt() * noise
    pred, _ = predict_noise(p, noisy, cond, step, patch)
    return F.mse_loss(pred, noise)


# ---------------------------------------------------------------- talker head


def init_talker_head(d_model: int, group_size: int, generator: torch.Generator | None,
                     n_tokens: int = TALKER_TOKENS) -> dict[str, TernaryWeight]:
    """One [n_tokens, d_model] projection to audio codec token logits."""
    return {"head": init_ternary(n_tokens, d_model, group_size, generator)}


def talker_head(p: dict[str, TernaryWeight], cond: torch.Tensor, stride: int, target_len: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cond [B, T, d] -> (logits [B, target_len, n_tokens], tokens [B, target_len] int64).

    One head call over all T tokens, each repeated ``stride`` times, truncated to ``target_len``; past
    ``T * stride`` the last position's logits repeat (the nested loop keeps emitting from the last state).
    """
    _check_states(cond, p["head"].in_features, "cond")
    if not isinstance(stride, int) or not isinstance(target_len, int) or stride < 1 or target_len < 1:
        raise ValueError(f"stride and target_len must be positive ints, got {stride!r}, {target_len!r}")
    logits = linear(p["head"], cond)
    src = (torch.arange(target_len, device=cond.device) // stride).clamp(max=cond.shape[1] - 1)
    logits = logits.index_select(1, src)
    return logits, logits.argmax(-1)


def _check_states(x: torch.Tensor, d_model: int, name: str) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model or x.shape[1] < 1 or not x.is_floating_point():
        raise ValueError(f"{name} must be float [B, T>=1, {d_model}], got {x.dtype} {tuple(x.shape)}")
