"""The float twin: the model's byte path as plain fp32 ``torch.nn`` modules trained by AdamW.

A baseline, not arbfn state: text sequencer (embedding + causal width-``window`` projection) -> pre-norm
causal blocks (RMSNorm, attention q/k/v/o, GELU MLP) -> RMSNorm -> byte head, with the shapes of
arbfn/layers/{text,block,attention,mlp,norm}.py and arbfn/model.py (no biases; RMSNorm gains are the
only vectors). Weights start at the ternary init's element std, ``2**e * sqrt(1 - 1/3)`` with ``e`` the
fan-in exponent of :func:`arbfn.ternary.init_exponent` (0 for the embedding), gains at 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arbfn.config import ModelConfig
from arbfn.ternary import init_exponent

ZERO_FRACTION = 1 / 3  # the ternary init's share of zero trits (arbfn.ternary.init_ternary's default)
NORM_EPS = 1e-6  # arbfn.layers.norm.rmsnorm's eps


def _ternary_std(exponent: int) -> float:
    """Element std of a fresh ternary weight of scale ``2**exponent``: the twin's init std."""
    return 2.0**exponent * math.sqrt(1 - ZERO_FRACTION)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class TwinBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``: arbfn/layers/block.py in fp32."""

    def __init__(self, d_model: int, d_ff: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d_model, eps=NORM_EPS), nn.RMSNorm(d_model, eps=NORM_EPS)
        self.q, self.k, self.v, self.o = (_linear(d_model, d_model) for _ in range(4))
        self.up, self.down = _linear(d_model, d_ff), _linear(d_ff, d_model)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Causal multi-head attention over x [B, T, d_model]."""
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = (lin(x).view(b, t, h, d // h).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class FloatTwin(nn.Module):
    """The byte path of ``cfg`` in fp32: ids [B, T] -> byte logits [B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"FloatTwin takes a ModelConfig, got {type(cfg).__name__}")
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.proj = _linear(cfg.window * cfg.d_embed, d)
        self.blocks = nn.ModuleList(TwinBlock(d, cfg.d_ff, cfg.n_heads) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.head = _linear(d, cfg.vocab_size)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Ternary-matched init: normal weights at the ternary element std, RMSNorm gains at 1."""
        self.embed.weight.normal_(0.0, _ternary_std(0), generator=generator)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, _ternary_std(init_exponent(m.in_features, ZERO_FRACTION)), generator=generator)
            elif isinstance(m, nn.RMSNorm):
                m.weight.fill_(1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be integer [batch, time], got shape {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.cfg.max_context:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_context {self.cfg.max_context}")
        e, t = self.embed(ids), ids.shape[1]
        x = self.proj(torch.cat([F.pad(e, (0, 0, i, 0))[:, :t] for i in range(self.cfg.window)], dim=-1))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def twin_loss(model: FloatTwin, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats (arbfn.objective.byte_loss's definition)."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_optimizer(model: FloatTwin, lr: float = 3e-3, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over every twin parameter (lr 3e-3, no weight decay: a short run on a small model)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def twin_step(model: FloatTwin, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One AdamW step on batch ``ids``; returns the batch loss in nats before the update."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = twin_loss(model, ids)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate_twin(model: FloatTwin, batches: list[torch.Tensor]) -> float:
    """Mean held-out loss in bits per byte over ``batches`` (as arbfn.train.evaluate)."""
    if not batches:
        raise ValueError("evaluate_twin needs at least one batch")
    model.eval()
    return sum(float(twin_loss(model, b)) for b in batches) / len(batches) / math.log(2)
