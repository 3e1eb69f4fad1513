"""The ARB model: [image | audio sequencers +] text sequencer -> causal ternary blocks -> [memory] -> [shared VQ
via the bridge] -> [graph hops over VQ codes] -> [MoE ACT] -> RMSNorm -> output router over byte / video / talker
heads.

Image and audio enter as frozen sidecar *features* (``arbfn.multimodal.featurize`` makes them eagerly; the
sidecars stay outside the state, which holds no float). Their sequencer positions precede the text in one
sequence, so causal attention lets every text position see them; the bridge sends each modality's span
through its own projection into the one shared codebook; the heads read the text positions only.

The whole model is a :class:`State` pytree: integer parameters, an int64 step counter, and the
:class:`ModelConfig` as static context, so ``apply_model(state, batch)`` needs nothing else.
:func:`forward` returns everything a train step needs (:class:`ModelOutput`); :func:`update_counters`
applies the integer counter learning (VQ usage, graph edge scores, memory strength) from its ``aux``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from arbfn.checking import checking_data
from arbfn.config import Config, ModelConfig
from arbfn.layers.block import blocks, init_block
from arbfn.layers.bridge import bridge, init_bridge
from arbfn.layers.graph import graph, init_graph, update_graph_counters
from arbfn.layers.heads import init_output_router, init_talker_head, init_video_head, output_router
from arbfn.layers.memory import init_memory, memory, update_memory_counters
from arbfn.layers.moe import init_moe, moe_act
from arbfn.layers.norm import init_rmsnorm, rmsnorm
from arbfn.layers.sequencers import audio_sequencer, image_sequencer, init_audio_sequencer, init_image_sequencer
from arbfn.layers.text import init_text_sequencer, text_sequencer
from arbfn.layers.vq import init_vq, update_vq_counters
from arbfn.ternary import (dither_flip_counters, fix_weights, init_ternary, linear, set_chain_places,
                           set_flip_counters)


@dataclasses.dataclass(frozen=True)
class State:
    """Model parameters (a dict tree of ternary weights and integer counters), the step counter, the config."""

    params: dict[str, Any]
    step: torch.Tensor
    config: ModelConfig


pytree.register_pytree_node(
    State,
    lambda s: ([s.params, s.step], s.config),
    lambda children, config: State(children[0], children[1], config),
    serialized_type_name="arbfn.State",
    flatten_with_keys_fn=lambda s: ([(pytree.GetAttrKey("params"), s.params), (pytree.GetAttrKey("step"), s.step)],
                                    s.config),
)


@dataclasses.dataclass
class ModelOutput:
    """Byte logits [B,T,vocab], router probabilities [B,T,3], final hidden states [B,T,d] (the heads'
    conditioning), all at the T text positions; the memory carry; and ``aux``: auxiliary losses (commitment,
    ponder) and the integer evidence counters learn from (VQ indices, memory slots: over every position,
    image and audio first)."""

    logits: torch.Tensor
    router: torch.Tensor
    hidden: torch.Tensor
    carry: Any
    aux: dict[str, torch.Tensor]


MODALITIES = ("image", "audio")
"""Feature modalities, in the order their positions precede the text."""


def modalities(cfg: ModelConfig) -> tuple[str, ...]:
    """The enabled feature modalities of ``cfg``, in stream order."""
    return tuple(m for m in MODALITIES if getattr(cfg, f"enable_{m}"))


def init_model(cfg: Config | ModelConfig, generator: torch.Generator | None = None) -> State:
    """Fresh state for ``cfg``; ``generator=None`` gives a shape-only state on the meta device. A full
    :class:`Config` also sets the flip-counter layout of its update mode (none for stochastic flips; int8 or
    4-bit nibbles by ``update.counter_bits``; a chain's place bits, outer for nonzero trits, the rest drawn after
    the weights, with no exponent accumulators), drops the norm gains' accumulators with
    ``update.fixed_norm_gains``, and, with ``update.dither``, draws the counters' starting values after the weights
    (the weights do not change)."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    g, gs, d, seq = generator, m.group_size, m.d_model, m.sequencers
    params: dict[str, Any] = {"text": init_text_sequencer(m.vocab_size, m.d_embed, m.window, d, gs, g)}
    if m.enable_image:
        params["image"] = init_image_sequencer(seq.image_features, d, gs, g, seq.image_window)
    if m.enable_audio:
        params["audio"] = init_audio_sequencer(seq.audio_features, d, gs, g, seq.audio_window)
    params["blocks"] = [init_block(d, m.d_ff, gs, g) for _ in range(m.n_layers)]
    if m.enable_memory:
        params["memory"] = init_memory(d, m.memory.n_slots, m.memory.d_hidden, gs, g)
    if m.enable_vq:
        params["bridge"] = init_bridge(d, (*modalities(m), "text"), gs, g)
        params["vq"] = init_vq(d, m.vq.code_dim, m.vq.n_codes, gs, g)
    if m.enable_graph:
        params["graph"] = init_graph(m.vq.n_codes, m.graph.d_node, d, m.graph.edges_per_node, gs, g)
    if m.enable_moe:
        params["moe"] = init_moe(d, m.moe.d_ff, m.moe.n_experts, gs, g)
    params["norm"] = init_rmsnorm(d, gs, g)
    params["router"] = init_output_router(d, gs, g)
    params["head"] = init_ternary(m.vocab_size, d, gs, g)
    params["video"] = init_video_head(d, m.heads.video_max_steps, gs, g)
    params["talker"] = init_talker_head(d, gs, g, m.heads.talker_tokens)
    device = "meta" if generator is None else None
    if isinstance(cfg, Config):  # the update's flip mode and width decide the weights' flip counters (fresh zeros)
        if cfg.update.fixed_norm_gains:
            params = fix_weights(params, is_norm_gain)
        if cfg.update.flip_mode == "chain":
            params = set_chain_places(params, generator)
        else:
            params = set_flip_counters(set_flip_counters(params, False), cfg.update.flip_counters,
                                       cfg.update.counter_bits)
        if cfg.update.flip_counters and cfg.update.dither and generator is not None:
            params = dither_flip_counters(params, cfg.update.flip_threshold, generator)
    return State(params, torch.zeros((), dtype=torch.int64, device=device), m)


def is_norm_gain(path: tuple) -> bool:
    """Whether a pytree path leads to an RMSNorm gain (a key ``norm...``): ``UpdateConfig.fixed_norm_gains``."""
    return any(isinstance(k, pytree.MappingKey) and str(k.key).startswith("norm") for k in path)


def check_batch(batch: torch.Tensor, cfg: ModelConfig) -> None:
    """Clear errors for token batches the model cannot take (skipped while tracing)."""
    if not checking_data():
        return
    if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"batch must be an integer tensor of token ids, got {type(batch).__name__}"
                        f"{'' if not isinstance(batch, torch.Tensor) else ' of ' + str(batch.dtype)}")
    if batch.dim() != 2:
        raise ValueError(f"batch must be [batch, time], got shape {tuple(batch.shape)}")
    if batch.numel() == 0:
        raise ValueError(f"batch is empty (shape {tuple(batch.shape)})")
    if batch.shape[1] > cfg.max_context:
        raise ValueError(f"sequence length {batch.shape[1]} exceeds max_context {cfg.max_context}")
    lo, hi = int(batch.min()), int(batch.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}, got range {lo}..{hi}")


def check_features(features: dict[str, torch.Tensor] | None, cfg: ModelConfig, batch_size: int) -> None:
    """Clear errors for sidecar features the model cannot take (the sequencers check each one's shape)."""
    for name, f in (features or {}).items():
        if name not in MODALITIES:
            raise ValueError(f"unknown feature modality {name!r}; known: {', '.join(MODALITIES)}")
        if not getattr(cfg, f"enable_{name}"):
            raise ValueError(f"{name} features given but enable_{name} is off in the model config")
        if not isinstance(f, torch.Tensor) or f.dim() != 3 or f.shape[0] != batch_size:
            raise ValueError(f"{name} features must be [{batch_size}, F, d_feature] (one row per batch row), got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")


def _sequences(p: dict[str, Any], cfg: ModelConfig, batch: torch.Tensor,
               features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each present modality's sequencer output [B, T_m, d_model], in stream order (image, audio, text)."""
    seq, out = cfg.sequencers, {}
    if "image" in features:
        out["image"] = image_sequencer(p["image"], features["image"], seq.image_window)
    if "audio" in features:
        out["audio"] = audio_sequencer(p["audio"], features["audio"], seq.audio_window)
    out["text"] = text_sequencer(p["text"], batch, cfg.window)
    return out


def forward(state: State, batch: torch.Tensor, carry: Any = None, fixed_loops: bool = False,
            features: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> ModelOutput:
    """Token ids [B, T] (+ sidecar ``features`` {"image": [B, P, d_image], "audio": [B, F, d_audio]}, each
    optional) -> :class:`ModelOutput`. ``carry`` continues the conversation memory of the previous segment;
    ``fixed_loops`` runs every halting loop for its full step count (compile-friendly); ``dtype`` (e.g. bf16)
    casts the residual stream at its start, so the blocks compute in it (None: fp32). Logits and router
    probabilities come out fp32 either way."""
    cfg, p = state.config, state.params
    check_batch(batch, cfg)
    check_features(features, cfg, batch.shape[0])
    aux: dict[str, torch.Tensor] = {}
    seqs = _sequences(p, cfg, batch, features or {})
    x = torch.cat(list(seqs.values()), dim=1)
    x = x if dtype is None else x.to(dtype)
    x = blocks(p["blocks"], x, cfg.n_heads)
    if cfg.enable_memory:
        x, carry, mem_aux = memory(p["memory"], x, carry)
        aux["memory_slots"] = mem_aux["slot_indices"]
    if cfg.enable_vq:
        # the residual stream grows with depth: quantize its direction (a parameter-free RMS normalisation)
        spans = F.rms_norm(x, (cfg.d_model,)).split([s.shape[1] for s in seqs.values()], dim=1)
        b = bridge(p["bridge"], p["vq"], dict(zip(seqs, spans)), exact_limit=cfg.vq.exact_limit,
                   n_candidates=cfg.vq.n_candidates)
        x = x + b.quantized.to(x.dtype)
        aux["vq_indices"], aux["commitment"] = b.indices, b.commitment
    if cfg.enable_graph:
        x, g_aux = graph(p["graph"], x, aux["vq_indices"], cfg.graph.max_hops, cfg.act_threshold, fixed=fixed_loops)
        aux["graph_ponder"] = g_aux["ponder"]
    if cfg.enable_moe:
        x, m_aux = moe_act(p["moe"], x, cfg.moe.top_k, cfg.moe.max_steps, cfg.act_threshold, fixed=fixed_loops,
                           dense_limit=cfg.moe.dense_limit)
        aux["moe_ponder"] = m_aux["ponder"]
    h = rmsnorm(p["norm"], x[:, x.shape[1] - batch.shape[1]:])
    return ModelOutput(linear(p["head"], h).float(), output_router(p["router"], h).float(), h, carry, aux)


def apply_model(state: State, batch: torch.Tensor) -> torch.Tensor:
    """Token ids [B, T] -> byte logits [B, T, vocab_size] (fp32)."""
    return forward(state, batch).logits


def update_counters(state: State, aux: dict[str, torch.Tensor]) -> State:
    """The integer counter learning of one step: VQ usage, graph edge scores, memory strength and decay."""
    cfg, p = state.config, dict(state.params)
    if cfg.enable_vq:
        p["vq"] = update_vq_counters(p["vq"], aux["vq_indices"])
    if cfg.enable_graph:
        p["graph"] = update_graph_counters(p["graph"], aux["vq_indices"])
    if cfg.enable_memory:
        p["memory"] = update_memory_counters(p["memory"], {"slot_indices": aux["memory_slots"]},
                                             cfg.memory.decay_every, state.step)
    return State(p, state.step, cfg)
