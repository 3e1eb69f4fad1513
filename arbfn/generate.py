"""Sampling bytes from a model state (eager) or an AOT-compiled package; both share one sampling loop.

Window: by default eager generation feeds the last ``max_context`` ids (the window grows with the text).
With ``window=W`` every step feeds exactly W ids: the last W of prompt + output, left-padded with the
pad id while the text is shorter. An AOT-compiled model has a fixed input shape, so it always samples
this way with W = its ``seq_len``; eager ``generate(..., window=W)`` then gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from arbfn import data
from arbfn.model import State, forward


def _window(ids: list[int], window: int | None) -> torch.Tensor:
    if window is None:
        return torch.tensor(ids, dtype=torch.int64)
    tail = ids[-window:]
    return torch.tensor([data.PAD_ID] * (window - len(tail)) + tail, dtype=torch.int64)


def sample(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: str, max_bytes: int, temperature: float,
           seed: int, window: int | None, max_context: int) -> str:
    """The sampling loop: ``next_logits(ids [1, T]) -> logits [1, T, vocab]``; specials are never sampled."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if window is not None and not 1 <= window <= max_context:
        raise ValueError(f"window must be in 1..{max_context}, got {window}")
    ids = data.encode(prompt).tolist() if prompt else [data.BOS_ID]
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_bytes):
        x = _window(ids + out, window)[-max_context:]
        logits = next_logits(x[None])[0, -1, : data.NUM_BYTES].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        out.append(nxt)
    return prompt + data.decode(torch.tensor(out, dtype=torch.int64))


@torch.no_grad()
def generate(state: State, prompt: str, max_bytes: int, temperature: float = 1.0, seed: int = 0,
             window: int | None = None) -> str:
    """Continue ``prompt`` by ``max_bytes`` sampled byte tokens (``window``: see the module docstring)."""
    device = state.step.device
    return sample(lambda x: forward(state, x.to(device), fixed_loops=window is not None).logits,
                  prompt, max_bytes, temperature, seed, window, state.config.max_context)


def generate_compiled(path: str | Path, prompt: str, max_bytes: int, temperature: float = 1.0, seed: int = 0) -> str:
    """Continue ``prompt`` with an AOT-compiled package (batch 1, a fixed window of its ``seq_len``)."""
    from arbfn.export import load_compiled

    model = load_compiled(path)
    if model.batch_size != 1:
        raise ValueError(f"generation needs a package compiled for batch size 1, {path} has {model.batch_size}")
    return sample(model, prompt, max_bytes, temperature, seed, model.seq_len, model.config.max_context)
