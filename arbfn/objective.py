"""The training objective: next-byte cross-entropy plus the auxiliary terms of the enabled components.

A batch is token ids [B, T] or a dict with ``"bytes"`` and optionally
``"video_latent"`` (B,16,1,32,32), ``"video_noise"`` (same shape) and ``"video_step"`` (int64 [B]) for the
VideoHead's noise-prediction loss, ``"audio_tokens"`` (int64 [B, L]) for the TalkerHead, and the frozen
sidecar features the image/audio sequencers take: ``"image_features"`` [B, P, d_image] (DINOv2 patches) and
``"audio_features"`` [B, F, d_audio] (Moonshine frames), made from pixels/audio by
``arbfn.multimodal.featurize``. Noise is part of the batch so that a step stays a pure function of state and
batch. The byte loss is over the text positions only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from arbfn.checking import checking_data
from arbfn.config import TrainConfig
from arbfn.layers.heads import talker_head, video_loss
from arbfn.model import State, forward

ROUTER_BYTE = 0  # index of the byte head in the output router
FEATURE_KEYS = {"image_features": "image", "audio_features": "audio"}  # batch key -> model feature modality


def as_batch(batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise a batch to the dict form; the byte rows need at least 2 tokens (next-byte targets)."""
    b = {"bytes": batch} if isinstance(batch, torch.Tensor) else dict(batch)
    if "bytes" not in b:
        raise ValueError(f"a batch dict needs 'bytes' (token ids), got keys {sorted(b)}")
    ids = b["bytes"]
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] < 2:
        raise ValueError(f"the loss needs at least 2 tokens per row (next-byte targets), got shape {tuple(ids.shape)}")
    unknown = set(b) - {"bytes", "video_latent", "video_noise", "video_step", "audio_tokens", *FEATURE_KEYS}
    if unknown:
        raise ValueError(f"unknown batch keys {sorted(unknown)}")
    video = {"video_latent", "video_noise", "video_step"} & set(b)
    if video and len(video) != 3:
        raise ValueError(f"video training needs video_latent, video_noise and video_step together, got {sorted(video)}")
    if checking_data():
        for k, v in b.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"batch[{k!r}] holds NaN or infinite values")
    return b


def byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats: logits[:, :-1] against ids[:, 1:]."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


def objective(state: State, batch: Any, tc: TrainConfig, fixed_loops: bool = False
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, aux): aux holds each loss term (detached) and the counters' evidence (VQ indices, slots).
    ``fixed_loops`` runs the halting loops for their full step count (what a compiled step traces)."""
    b = as_batch(batch)
    features = {m: b[k] for k, m in FEATURE_KEYS.items() if k in b}
    out = forward(state, b["bytes"], fixed_loops=fixed_loops, features=features, dtype=tc.dtype)
    terms = {"byte_loss": byte_loss(out.logits, b["bytes"]),
             "router_loss": -torch.log(out.router[..., ROUTER_BYTE].clamp_min(1e-6)).mean()}
    if "commitment" in out.aux:
        terms["commitment"] = out.aux["commitment"]
    ponder = [out.aux[k] for k in ("graph_ponder", "moe_ponder") if k in out.aux]
    if ponder:
        terms["ponder"] = tc.ponder_weight * torch.stack([p.float() for p in ponder]).sum()
    p, heads = state.params, state.config.heads
    if "video_latent" in b:
        cond = out.hidden.to(b["video_latent"].dtype)  # the denoiser attends from the latent's dtype
        terms["video_loss"] = video_loss(p["video"], cond, b["video_latent"], b["video_noise"], b["video_step"])
    if "audio_tokens" in b:
        target = b["audio_tokens"]
        logits, _ = talker_head(p["talker"], out.hidden, heads.talker_stride, target.shape[1])
        terms["talker_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    loss = torch.stack(list(terms.values())).sum()
    evidence = {k: out.aux[k] for k in ("vq_indices", "memory_slots") if k in out.aux}
    return loss, {**{k: v.detach() for k, v in terms.items()}, **evidence}
