"""Sampling bytes from a model state (eager; recomputes the window each byte)."""

from __future__ import annotations

import torch

from arbfn import data
from arbfn.model import State, apply_model


@torch.no_grad()
def generate(state: State, prompt: str, max_bytes: int, temperature: float = 1.0, seed: int = 0) -> str:
    """Continue ``prompt`` by ``max_bytes`` sampled byte tokens (specials are never sampled)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = data.encode(prompt) if prompt else torch.tensor([data.BOS_ID])
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    ctx = state.config.max_context
    for _ in range(max_bytes):
        window = torch.cat([ids, torch.tensor(out, dtype=torch.int64)])[-ctx:]
        logits = apply_model(state, window[None].to(state.step.device))[0, -1, : data.NUM_BYTES].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        out.append(nxt)
    return prompt + data.decode(torch.tensor(out, dtype=torch.int64))
