"""The byte model: TextSequencer -> causal ternary blocks -> RMSNorm -> byte head (297 logits).

The whole model is a :class:`State` pytree: integer parameters, an int64 step counter, and the
:class:`ModelConfig` as static context, so ``apply_model(state, batch)`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from arbfn.config import Config, ModelConfig
from arbfn.layers.block import block, init_block
from arbfn.layers.norm import init_rmsnorm, rmsnorm
from arbfn.layers.text import init_text_sequencer, text_sequencer
from arbfn.ternary import init_ternary, linear


@dataclasses.dataclass(frozen=True)
class State:
    """Model parameters (a dict tree of ternary weights), the step counter, and the model config."""

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


def init_model(cfg: Config | ModelConfig, generator: torch.Generator | None = None) -> State:
    """Fresh state for ``cfg``; ``generator=None`` gives a shape-only state on the meta device."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    g, gs = generator, m.group_size
    params = {
        "text": init_text_sequencer(m.vocab_size, m.d_embed, m.window, m.d_model, gs, g),
        "blocks": [init_block(m.d_model, m.d_ff, gs, g) for _ in range(m.n_layers)],
        "norm": init_rmsnorm(m.d_model, gs, g),
        "head": init_ternary(m.vocab_size, m.d_model, gs, g),
    }
    device = "meta" if generator is None else None
    return State(params, torch.zeros((), dtype=torch.int64, device=device), m)


def check_batch(batch: torch.Tensor, cfg: ModelConfig) -> None:
    """Clear errors for token batches the model cannot take (skipped while tracing)."""
    if torch.compiler.is_compiling():
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


def apply_model(state: State, batch: torch.Tensor) -> torch.Tensor:
    """Token ids [B, T] -> logits [B, T, vocab_size] (fp32)."""
    cfg, p = state.config, state.params
    check_batch(batch, cfg)
    x = text_sequencer(p["text"], batch, cfg.window)
    for bp in p["blocks"]:
        x = block(bp, x, cfg.n_heads)
    return linear(p["head"], rmsnorm(p["norm"], x))
