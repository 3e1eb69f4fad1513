"""Multimodal VQ bridge: per-modality ternary projections into one sequence that indexes one shared codebook.

Each present modality is projected by its own ternary linear, the projections are concatenated along
time in the order of ``modalities``, and one shared ``vq`` call quantises them all (the original's
multimodal smoke: 8 text + 254 image + 36 audio = 298 indices).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from arbfn.layers.vq import vq
from arbfn.ternary import TernaryWeight, init_ternary, linear


class BridgeOutput(NamedTuple):
    """Quantised [B, sum T_m, d], indices [B, sum T_m], commitment, and each modality's [start, end) span."""

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    spans: dict[str, tuple[int, int]]


def init_bridge(d_model: int, modalities: tuple[str, ...], group_size: int,
                generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """One [d_model, d_model] ternary projection per modality, in the given (concatenation) order."""
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"init_bridge needs distinct modality names, got {modalities!r}")
    return {m: init_ternary(d_model, d_model, group_size, generator) for m in modalities}


def bridge(p: dict[str, TernaryWeight], vq_params: dict, seqs: dict[str, torch.Tensor], **vq_kwargs) -> BridgeOutput:
    """Project each modality of ``seqs`` ([B, T_m, d_model]), concatenate in ``p``'s order, quantise once."""
    unknown = sorted(set(seqs) - set(p))
    if unknown:
        raise ValueError(f"bridge: unknown modalities {unknown}; known {list(p)}")
    present = [m for m in p if m in seqs]
    if not present:
        raise ValueError("bridge needs at least one modality sequence")
    batch = seqs[present[0]].shape[0]
    parts, spans, start = [], {}, 0
    for m in present:
        x = seqs[m]
        if x.dim() != 3 or x.shape[0] != batch or x.shape[2] != p[m].in_features:
            raise ValueError(f"bridge: {m} must be [{batch}, T, {p[m].in_features}], got {tuple(x.shape)}")
        parts.append(linear(p[m], x))
        spans[m] = (start, start + x.shape[1])
        start += x.shape[1]
    out = vq(vq_params, torch.cat(parts, dim=1), **vq_kwargs)
    return BridgeOutput(out.quantized, out.indices, out.commitment, spans)
