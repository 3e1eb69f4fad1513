"""Shared VQ: a ternary codebook with exact lookup for small books and sign-bucket candidates for huge ones.

``z = proj_in(x)`` is snapped to its nearest code (squared L2). Small books (``n_codes <= exact_limit``)
score every code through the ternary linear op (``z @ C.T``) and code norms from the packed table.
Huge books never decode the whole table: the signs of z's first dims pick a bucket, a fixed integer
hash of the bucket picks a window of ``n_candidates`` consecutive ids (mod ``n_codes``), and only those
rows are gathered with the embedding op (which decodes only the rows touched) and compared.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from arbfn.checking import checking_data
from arbfn.ternary import TernaryWeight, decode, embed, init_ternary, linear

BUCKET_BITS = 16  # sign bits of z that form the candidate bucket (fewer when code_dim is smaller)
_MASK32 = 0xFFFFFFFF
INT16_MAX = torch.iinfo(torch.int16).max


class VQOutput(NamedTuple):
    """Quantised vectors [..., d_in], code indices [...] (int64) and the scalar commitment term."""

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor


def init_vq(d_in: int, code_dim: int, n_codes: int, group_size: int,
            generator: torch.Generator | None) -> dict[str, TernaryWeight | torch.Tensor]:
    """proj_in [code_dim, d_in], codebook [n_codes, code_dim], proj_out [d_in, code_dim], int16 usage [n_codes].

    The codebook uses exponent 0 (entries in {-1, 0, 1}): fan-in scaled ``proj_in`` gives z about unit
    std per dim, so unit-scale codes sit where z lives (a fan-in scaled book would be ~1/sqrt(code_dim)
    too small and every z would snap to the codes of smallest norm).
    """
    for name, v in (("d_in", d_in), ("code_dim", code_dim), ("n_codes", n_codes)):
        if v < 1:
            raise ValueError(f"init_vq: {name} must be positive, got {v}")
    usage_device = "meta" if generator is None else None
    return {"proj_in": init_ternary(code_dim, d_in, group_size, generator),
            "codebook": init_ternary(n_codes, code_dim, group_size, generator, exponent=0),
            "proj_out": init_ternary(d_in, code_dim, group_size, generator),
            "usage": torch.zeros(n_codes, dtype=torch.int16, device=usage_device)}


def candidate_ids(z: torch.Tensor, n_codes: int, n_candidates: int) -> torch.Tensor:
    """Deterministic candidate ids [..., n_candidates] from the sign pattern of z's first dims."""
    bits = min(BUCKET_BITS, z.shape[-1])
    weights = torch.pow(2, torch.arange(bits, device=z.device, dtype=torch.int64))
    bucket = ((z[..., :bits] >= 0).to(torch.int64) * weights).sum(-1)
    h = (bucket * 0x9E3779B1 + 0x7F4A7C15) & _MASK32  # 32-bit mixing; every product stays below 2**63
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _MASK32
    h = h ^ (h >> 12)
    offsets = torch.arange(n_candidates, device=z.device, dtype=torch.int64)
    return (h.unsqueeze(-1) + offsets) % n_codes


def _nearest_exact(book: TernaryWeight, z: torch.Tensor) -> torch.Tensor:
    """argmin_c ||z - c||^2 over the whole book: ||c||^2 - 2 z.c with z.c from the ternary linear op."""
    norms = decode(book).square().sum(-1)
    return (norms - 2 * linear(book, z)).argmin(-1)


def _nearest_candidates(book: TernaryWeight, z: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """argmin over the candidate rows only (gathered by the embedding op); ties pick the first candidate."""
    cand = candidate_ids(z, book.out_features, n_candidates)
    rows = embed(book, cand)  # [..., K, code_dim]; only these rows are decoded
    dist = (rows - z.unsqueeze(-2)).square().sum(-1)
    return cand.gather(-1, dist.argmin(-1, keepdim=True)).squeeze(-1)


def quantize(book: TernaryWeight, z: torch.Tensor, exact_limit: int = 65536, n_candidates: int = 64
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snap z [..., code_dim] to its nearest code: (straight-through zq, indices, commitment)."""
    if exact_limit < 0 or n_candidates < 1:
        raise ValueError(f"quantize needs exact_limit >= 0 and n_candidates >= 1, got {exact_limit}, {n_candidates}")
    search = dataclasses.replace(book, probe=None)  # the argmin carries no gradient
    with torch.no_grad():
        zd = z.detach()
        if book.out_features <= exact_limit:
            indices = _nearest_exact(search, zd)
        else:
            indices = _nearest_candidates(search, zd, n_candidates)
    code = embed(book, indices)
    zq = z + (code - z).detach()
    commitment = (z - code.detach()).square().mean() * 0.25 + (code - z.detach()).square().mean()
    return zq, indices, commitment


def vq(p: dict, x: torch.Tensor, exact_limit: int = 65536, n_candidates: int = 64) -> VQOutput:
    """Quantise x [..., d_in] through the shared codebook (straight-through), with commitment loss."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("vq expects a floating-point tensor")
    if x.dim() < 1 or x.shape[-1] != p["proj_in"].in_features:
        raise ValueError(f"vq expects inputs [..., {p['proj_in'].in_features}], got {tuple(x.shape)}")
    zq, indices, commitment = quantize(p["codebook"], linear(p["proj_in"], x), exact_limit, n_candidates)
    return VQOutput(linear(p["proj_out"], zq), indices, commitment)


def update_vq_counters(p: dict, indices: torch.Tensor) -> dict:
    """New params with ``usage[c] += count(c in indices)`` saturating at int16 max; only touched codes move."""
    usage: torch.Tensor = p["usage"]
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"update_vq_counters expects integer indices, got {indices.dtype}")
    flat = indices.reshape(-1).to(torch.int64)
    if checking_data() and flat.numel() and (flat.min() < 0 or flat.max() >= usage.numel()):
        raise ValueError(f"update_vq_counters: indices must lie in [0, {usage.numel()})")
    # each occurrence's count of its code, with fixed shapes (no unique: a CUDA graph can capture this)
    ordered = flat.sort().values
    counts = torch.searchsorted(ordered, flat, right=True) - torch.searchsorted(ordered, flat)
    new = (usage[flat].to(torch.int64) + counts).clamp_max(INT16_MAX).to(torch.int16)
    return {**p, "usage": usage.index_put((flat,), new)}  # repeated codes write the same value
