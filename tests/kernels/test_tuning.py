"""Every config an autotuned kernel may pick computes the same result (tests/kernels check the default one
over many shapes; this runs each tuning config directly, so whatever a GPU's tuner chooses is covered)."""

from __future__ import annotations

import pytest
import torch

from kernels._triton import cdiv
from kernels.embedding import _embedding_fwd_kernel, embedding_fwd_reference
from kernels.linear import _decode_kernel, _linear_gemv_kernel, gemv_slots, gemv_splits
from kernels.packing import decode_reference, n_groups, pack_reference, packed_width

SHAPES = [(7, 133, 32), (33, 2563, 6), (5, 1030, 96)]  # (rows, columns, group size): ragged edges everywhere
GEMV_SHAPES = [(7, 133, 32), (33, 611, 6), (5, 1030, 96)]  # the GEMV interprets slowly: fewer groups


def weight(n: int, k: int, gs: int, g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    e = torch.randint(-12, 6, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    return p.to(device), e.to(device)


def launch(kernel, config, grid, *args, **kwargs) -> None:
    """One launch of ``kernel``'s plain function with ``config``'s meta-parameters and warps."""
    kernel.fn[grid(config.kwargs)](*args, **kwargs, **config.kwargs, num_warps=config.num_warps)


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_every_decode_config_is_exact(kernel_device, n, k, gs):
    g = torch.Generator().manual_seed(k)
    p, e = weight(n, k, gs, g, kernel_device)
    ref = decode_reference(p.cpu(), e.cpu(), k, gs)
    for config in _decode_kernel.configs:
        w = torch.full((n, k), float("nan"), device=kernel_device)
        launch(_decode_kernel, config, lambda m: (cdiv(n, m["BLOCK_N"]), cdiv(k, m["BLOCK_K"])),
               p, e, w, n, k, packed_width(k), n_groups(k, gs), GS=gs)
        assert torch.equal(w.cpu(), ref), config


@pytest.mark.parametrize("n,k,gs", GEMV_SHAPES)
def test_every_gemv_config_matches_reference(kernel_device, n, k, gs):
    g = torch.Generator().manual_seed(k + 1)
    p, e = weight(n, k, gs, g, kernel_device)
    x = torch.randn((1, k), generator=g)
    w = decode_reference(p.cpu(), e.cpu(), k, gs).double()
    ref, mag = x.double() @ w.T, x.double().abs() @ w.abs().T
    groups = n_groups(k, gs)
    split = gemv_splits(n, groups, gs)
    for config in _linear_gemv_kernel.configs:
        part = torch.full((1, split, n), float("nan"), device=kernel_device)
        launch(_linear_gemv_kernel, config, lambda m: (cdiv(n, m["BLOCK_N"]), split, 1), x.to(kernel_device), part,
               p, e, n, k, packed_width(k), groups, cdiv(groups, split), GS=gs, SLOTS=gemv_slots(gs))
        y = part.sum(1).cpu().double()
        assert float((y - ref).norm() / mag.norm()) < 1e-5, config


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_every_embedding_config_is_exact(kernel_device, n, k, gs):
    g = torch.Generator().manual_seed(k + 2)
    p, e = weight(n, k, gs, g, kernel_device)
    ids = torch.randint(0, n, (37,), generator=g).to(kernel_device)
    ref = embedding_fwd_reference(ids.cpu(), p.cpu(), e.cpu(), k, gs)
    for config in _embedding_fwd_kernel.configs:
        out = torch.full((37, k), float("nan"), device=kernel_device)
        launch(_embedding_fwd_kernel, config, lambda m: (cdiv(37, m["BLOCK_R"]), cdiv(k, m["BLOCK_D"])),
               ids, p, e, out, 37, k, packed_width(k), n_groups(k, gs), GS=gs)
        assert torch.equal(out.cpu(), ref), config
