"""Ternary embedding: gather rows of ``W = T * 2**E`` by id, decoding only the rows touched.

Op: ``arbfn::embedding_fwd`` (ids [...] -> [..., dim] fp32). The weight-gradient signal is sparse in
content: the probe's gradient is ``index_add`` of the output gradient into the rows that were gathered
(every other row is exactly zero, so the update casts no vote there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotuned, cdiv, check_launchable, decode_octets, octet_columns
from kernels._vmap import activation_vmap_rule
from kernels.packing import n_groups, packed_width, unpack_reference


def embedding_fwd_reference(ids: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """Pure-torch gather + decode of the rows named by ``ids`` (only those rows are unpacked)."""
    flat = ids.reshape(-1)
    rows_t = unpack_reference(packed[flat], dim).to(torch.float32)
    cols = torch.arange(dim, device=packed.device)
    scale = torch.exp2(exp[flat].to(torch.float32)[:, cols // group_size])
    return (rows_t * scale).reshape(*ids.shape, dim)


@autotuned([triton.Config({"BLOCK_R": br, "BLOCK_T": bt}, num_warps=w)
            for br, bt, w in ((4, 128, 4), (8, 32, 2), (16, 16, 4), (32, 8, 4))], key=["D", "GS"])
@triton.jit(do_not_specialize=["R", "KB", "G"])  # only D's divisibility matters (the stores' row stride)
def _embedding_fwd_kernel(ids_ptr, packed_ptr, exp_ptr, out_ptr, R, D, KB, G, GS: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows ``ids[r]`` of W, BLOCK_T octets (8 columns) each, decoded by :func:`kernels._triton.decode_octets`."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    octets = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = r < R
    rows = tl.load(ids_ptr + r, mask=row_mask, other=0)
    w = decode_octets(packed_ptr, exp_ptr, rows, octets, row_mask, D, KB, G, GS)
    cols = octet_columns(octets)
    tl.store(out_ptr + r[:, None, None] * D + cols, w, mask=row_mask[:, None, None] & (cols < D))


def embedding_fwd_triton(ids: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """Launch the gather kernel (CUDA, or CPU under the interpreter)."""
    check_launchable(ids, packed, exp)
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), dim), dtype=torch.float32, device=packed.device)
    if out.numel():
        grid = lambda meta: (cdiv(flat.numel(), meta["BLOCK_R"]), cdiv(dim, 8 * meta["BLOCK_T"]))
        _embedding_fwd_kernel[grid](flat, packed.contiguous(), exp.contiguous(), out, flat.numel(), dim,
                                    packed_width(dim), n_groups(dim, group_size), GS=group_size)
    return out.reshape(*ids.shape, dim)


@torch.library.custom_op("arbfn::embedding_fwd", mutates_args=())
def embedding_fwd(ids: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """Rows ``T[ids] * 2**E[ids]`` as fp32 [..., dim]."""
    return embedding_fwd_reference(ids, packed, exp, dim, group_size)


@embedding_fwd.register_kernel("cuda")
def _(ids, packed, exp, dim, group_size):
    return embedding_fwd_triton(ids, packed, exp, dim, group_size)


@embedding_fwd.register_fake
def _(ids, packed, exp, dim, group_size):
    return packed.new_empty((*ids.shape, dim), dtype=torch.float32)


torch.library.register_vmap("arbfn::embedding_fwd", activation_vmap_rule(embedding_fwd))


class _TernaryEmbedding(torch.autograd.Function):
    """Split-style Function around the gather op; backward scatters into the touched rows only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(ids, packed, exp, probe, dim, group_size):
        return embedding_fwd(ids, packed, exp, dim, group_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ids, packed, exp, probe, dim, group_size = inputs
        ctx.save_for_backward(ids)
        ctx.rows, ctx.dim = packed.shape[0], dim
        ctx.probe_dtype = probe.dtype if probe is not None else None

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[3]:
            with torch.no_grad():
                zeros = g.new_zeros((ctx.rows, ctx.dim), dtype=ctx.probe_dtype)
                grad_w = zeros.index_add(0, ids.reshape(-1), g.reshape(-1, ctx.dim).to(ctx.probe_dtype))
        return None, None, None, grad_w, None, None


def ternary_embedding(ids: torch.Tensor, packed: torch.Tensor, exp: torch.Tensor, probe: torch.Tensor | None,
                      dim: int, group_size: int) -> torch.Tensor:
    """Differentiable ternary embedding lookup; ``probe`` ([rows, dim] zeros or None) receives ``dL/dW``."""
    return _TernaryEmbedding.apply(ids, packed, exp, probe, dim, group_size)
