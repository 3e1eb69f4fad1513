"""TextSequencer: byte embeddings over a causal width-``window`` window, projected to the model width.

Position t sees the embeddings of bytes t-window+1..t (zeros before the start), concatenated and
projected by one ternary linear: the original's trigram context mixer for ``window=3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arbfn.ternary import TernaryWeight, embed, init_ternary, linear


def init_text_sequencer(vocab: int, d_embed: int, window: int, d_model: int, group_size: int,
                        generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """Embedding table [vocab, d_embed] (unit-scale rows) and projection [d_model, window*d_embed]."""
    return {"embed": init_ternary(vocab, d_embed, group_size, generator, exponent=0),
            "proj": init_ternary(d_model, window * d_embed, group_size, generator)}


def text_sequencer(p: dict[str, TernaryWeight], ids: torch.Tensor, window: int) -> torch.Tensor:
    """ids [B, T] -> [B, T, d_model]."""
    e = embed(p["embed"], ids)
    t = ids.shape[1]
    shifted = [F.pad(e, (0, 0, i, 0))[:, :t] for i in range(window)]
    return linear(p["proj"], torch.cat(shifted, dim=-1))
