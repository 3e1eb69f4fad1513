"""Graph hop ops: edge weighting + target aggregation, and the VQ-index gather + residual add.

Ops: ``arbfn::edge_aggregate`` (h [V, D] -> agg [V, D]), ``arbfn::edge_aggregate_bwd`` (its gradient
for h) and ``arbfn::gather_residual`` (x [..., D] + nodes[idx]).

Edges are integer state (src/dst int32, attr int8 in {-1, 0, 1}, score int8): edge ``e`` carries
``w_e = attr_e * score_e / 127`` divided by the in-degree of its target, so
``agg[v] = sum_{e: dst_e = v} w_e / max(1, indeg(v)) * h[src_e]``. Its gradient for h is the same
sum with the roles of src and dst swapped (the edge scale still uses indeg of dst), so one Triton
kernel serves both directions: edges in blocks x features in blocks, each program loads the rows
it gathers and ``tl.atomic_add``s the scaled rows into a zeroed fp32 output. Atomics rather than CSR
because the edge list needs no sort (dst is random; a CSR would need an argsort by dst for the forward
and by src for the backward on every call) and with ~10 edges per node the contention is small; the
price is fp32 summation order, so results match the reference to rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable
from kernels._vmap import data_checkable, per_sample

# ---------------------------------------------------------------- references


def in_degree(dst: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """int32 [n_nodes]: edges into each node. A scatter-add, not ``bincount``, whose CUDA version reads the
    maximum back to the host: that sync would break CUDA-graph capture of the compiled loops."""
    counts = torch.zeros(n_nodes, dtype=torch.int32, device=dst.device)
    return counts.index_add_(0, dst.long(), torch.ones_like(dst, dtype=torch.int32))


def edge_scale(dst: torch.Tensor, attr: torch.Tensor, score: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Per-edge fp32 weight ``attr * score / 127 / max(1, indeg(dst))`` (indeg counts every edge)."""
    indeg = in_degree(dst, n_nodes).clamp_min(1)
    return attr.float() * score.float() / 127.0 / indeg[dst.long()].float()


def _scatter_reference(h: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    msgs = h[gather.long()].float() * scale[:, None]
    return out.index_add(0, scatter.long(), msgs).to(h.dtype)


def edge_aggregate_reference(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                             score: torch.Tensor) -> torch.Tensor:
    """Pure-torch forward in fp32 accumulation; output in h's dtype."""
    return _scatter_reference(h, src, dst, edge_scale(dst, attr, score, h.shape[0]))


def edge_aggregate_bwd_reference(g: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                                 score: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``dL/dh``: ``grad[src_e] += w_e / max(1, indeg(dst_e)) * g[dst_e]``."""
    return _scatter_reference(g, dst, src, edge_scale(dst, attr, score, g.shape[0]))


def gather_residual_reference(x: torch.Tensor, nodes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``x + nodes[idx]``."""
    return x + nodes[idx]


# ---------------------------------------------------------------- Triton kernels


@triton.jit(do_not_specialize=["E"])  # D specialised: 16-byte row vectors where D is a multiple of 16
def _edge_scatter_kernel(h_ptr, gather_ptr, scatter_ptr, dst_ptr, attr_ptr, score_ptr, indeg_ptr, out_ptr, E, D,
                         BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    emask = e < E
    mask = emask[:, None] & (cols[None, :] < D)
    gat = tl.load(gather_ptr + e, mask=emask, other=0).to(tl.int64)
    sca = tl.load(scatter_ptr + e, mask=emask, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + e, mask=emask, other=0)
    w = tl.load(attr_ptr + e, mask=emask, other=0).to(tl.float32) * tl.load(score_ptr + e, mask=emask, other=0).to(tl.float32)
    deg = tl.maximum(tl.load(indeg_ptr + dst, mask=emask, other=1), 1).to(tl.float32)
    w = w / 127.0 / deg
    rows = tl.load(h_ptr + gat[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + sca[:, None] * D + cols[None, :], rows * w[:, None], mask=mask, sem="relaxed")


def _edge_scatter_triton(h: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, dst: torch.Tensor,
                         attr: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    check_launchable(h, gather, scatter, attr, score)
    v, d = h.shape
    out = torch.zeros((v, d), dtype=torch.float32, device=h.device)
    e = dst.numel()
    if out.numel() and e:
        indeg = in_degree(dst, v)
        _edge_scatter_kernel[(cdiv(e, 32), cdiv(d, 64))](
            h.contiguous(), gather.contiguous(), scatter.contiguous(), dst.contiguous(), attr.contiguous(),
            score.contiguous(), indeg, out, e, d, BLOCK_E=32, BLOCK_D=64)
    return out.to(h.dtype)


def edge_aggregate_triton(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                          score: torch.Tensor) -> torch.Tensor:
    """Launch the forward: gather rows at src, scatter into dst."""
    return _edge_scatter_triton(h, src, dst, dst, attr, score)


def edge_aggregate_bwd_triton(g: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                              score: torch.Tensor) -> torch.Tensor:
    """Launch the h-gradient: gather rows of g at dst, scatter into src (same edge scale)."""
    return _edge_scatter_triton(g, dst, src, dst, attr, score)


@triton.jit(do_not_specialize=["R"])  # D specialised: 16-byte row vectors where D is a multiple of 16
def _gather_residual_kernel(x_ptr, nodes_ptr, idx_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < R
    mask = rmask[:, None] & (cols[None, :] < D)
    rows = tl.load(idx_ptr + r, mask=rmask, other=0)
    x = tl.load(x_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0)
    n = tl.load(nodes_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + r[:, None] * D + cols[None, :], x + n, mask=mask)


def gather_residual_triton(x: torch.Tensor, nodes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Launch the gather + residual kernel; x [..., D], idx [...] -> [..., D]."""
    check_launchable(x, nodes, idx)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    out = torch.empty_like(x2)
    if out.numel():
        _gather_residual_kernel[(cdiv(x2.shape[0], 16), cdiv(d, 128))](
            x2, nodes.contiguous(), idx.reshape(-1).contiguous(), out, x2.shape[0], d, BLOCK_R=16, BLOCK_D=128)
    return out.reshape(x.shape)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::edge_aggregate", mutates_args=())
def edge_aggregate_op(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                      score: torch.Tensor) -> torch.Tensor:
    """Messages of weighted edges summed into their targets, normalised by in-degree."""
    return edge_aggregate_reference(h, src, dst, attr, score)


@edge_aggregate_op.register_kernel("cuda")
def _(h, src, dst, attr, score):
    return edge_aggregate_triton(h, src, dst, attr, score)


@edge_aggregate_op.register_fake
def _(h, src, dst, attr, score):
    return torch.empty_like(h)


@torch.library.custom_op("arbfn::edge_aggregate_bwd", mutates_args=())
def edge_aggregate_bwd_op(g: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                          score: torch.Tensor) -> torch.Tensor:
    """The gradient of ``edge_aggregate`` for h given the output gradient g [V, D]."""
    return edge_aggregate_bwd_reference(g, src, dst, attr, score)


@edge_aggregate_bwd_op.register_kernel("cuda")
def _(g, src, dst, attr, score):
    return edge_aggregate_bwd_triton(g, src, dst, attr, score)


@edge_aggregate_bwd_op.register_fake
def _(g, src, dst, attr, score):
    return torch.empty_like(g)


def _feature_fold_vmap_rule(op):
    """A batched node-state tensor [N, V, D] folds into the feature dim ([V, N*D]: one launch); batched
    edges (rare) fall back to one launch per sample."""

    def rule(info, in_dims, h, *edges):
        if all(d is None for d in in_dims[1:]):
            hb = h.movedim(in_dims[0], 1)
            v, n, d = hb.shape
            return op(hb.reshape(v, n * d), *edges).reshape(v, n, d), 1
        return torch.stack(per_sample(op, info.batch_size, in_dims, (h, *edges))), 0

    return rule


torch.library.register_vmap("arbfn::edge_aggregate", _feature_fold_vmap_rule(edge_aggregate_op))
torch.library.register_vmap("arbfn::edge_aggregate_bwd", _feature_fold_vmap_rule(edge_aggregate_bwd_op))


@torch.library.custom_op("arbfn::gather_residual", mutates_args=())
def gather_residual_op(x: torch.Tensor, nodes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x + nodes[idx]`` for x [..., D], nodes [V, D], idx [...] int64."""
    return gather_residual_reference(x, nodes, idx)


@gather_residual_op.register_kernel("cuda")
def _(x, nodes, idx):
    return gather_residual_triton(x, nodes, idx)


@gather_residual_op.register_fake
def _(x, nodes, idx):
    return torch.empty_like(x)


def _gather_residual_vmap(info, in_dims, x, nodes, idx):
    x_dim, nodes_dim, idx_dim = in_dims
    n = info.batch_size
    if nodes_dim is None:  # x and idx batches fold into the op's leading dims (one launch)
        xb = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
        ib = idx.movedim(idx_dim, 0) if idx_dim is not None else idx.expand(n, *idx.shape)
        return gather_residual_op(xb, nodes, ib), 0
    outs = [gather_residual_op(*(a.select(d, i) if d is not None else a for a, d in zip((x, nodes, idx), in_dims)))
            for i in range(n)]
    return torch.stack(outs), 0


torch.library.register_vmap("arbfn::gather_residual", _gather_residual_vmap)


# ---------------------------------------------------------------- autograd


class _EdgeAggregate(torch.autograd.Function):
    """Split-style Function: the gradient flows to h only (the edges are integer state)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, src, dst, attr, score):
        return edge_aggregate_op(h, src, dst, attr, score)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, src, dst, attr, score = inputs
        ctx.save_for_backward(src, dst, attr, score)

    @staticmethod
    def backward(ctx, g):
        src, dst, attr, score = ctx.saved_tensors
        with torch.no_grad():
            grad_h = edge_aggregate_bwd_op(g, src, dst, attr, score) if ctx.needs_input_grad[0] else None
        return grad_h, None, None, None, None


class _GatherResidual(torch.autograd.Function):
    """Split-style Function: ``dL/dx = g``; ``dL/dnodes`` = index_add of g into the gathered rows only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, nodes, idx):
        return gather_residual_op(x, nodes, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, nodes, idx = inputs
        ctx.save_for_backward(idx)
        ctx.n_nodes, ctx.nodes_dtype = nodes.shape[0], nodes.dtype

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        grad_nodes = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                d = g.shape[-1]
                zeros = g.new_zeros((ctx.n_nodes, d), dtype=ctx.nodes_dtype)
                grad_nodes = zeros.index_add(0, idx.reshape(-1), g.reshape(-1, d).to(ctx.nodes_dtype))
        return g if ctx.needs_input_grad[0] else None, grad_nodes, None


def _check_edges(n_nodes: int, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor, score: torch.Tensor) -> None:
    for name, t, dtype in (("src", src, torch.int32), ("dst", dst, torch.int32), ("attr", attr, torch.int8),
                           ("score", score, torch.int8)):
        if t.dtype != dtype or t.dim() != 1 or t.shape != src.shape:
            raise TypeError(f"{name} must be {dtype} [E] with E = {src.numel()}, got {t.dtype} {tuple(t.shape)}")
    if src.numel() and data_checkable(src, dst):
        lo, hi = int(torch.minimum(src.min(), dst.min())), int(torch.maximum(src.max(), dst.max()))
        if lo < 0 or hi >= n_nodes:
            raise ValueError(f"edge endpoints must be in 0..{n_nodes - 1}, got {lo}..{hi}")


def edge_aggregate(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, attr: torch.Tensor,
                   score: torch.Tensor) -> torch.Tensor:
    """Differentiable (in h) ``agg[v] = sum_{dst_e = v} attr_e*score_e/127 / max(1, indeg v) * h[src_e]``."""
    if not h.is_floating_point() or h.dim() != 2:
        raise TypeError(f"h must be a float [V, D] tensor, got {h.dtype} {tuple(h.shape)}")
    _check_edges(h.shape[0], src, dst, attr, score)
    return _EdgeAggregate.apply(h, src, dst, attr, score)


def gather_residual(x: torch.Tensor, nodes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Differentiable (in x and nodes) ``x + nodes[idx]``: x [..., D], nodes [V, D], idx int64 [...]."""
    if not x.is_floating_point() or nodes.dtype != x.dtype or nodes.dim() != 2 or nodes.shape[1] != x.shape[-1]:
        raise TypeError(f"need x [..., D] and nodes [V, D] of one float dtype, got {x.dtype} {tuple(x.shape)} "
                        f"and {nodes.dtype} {tuple(nodes.shape)}")
    if idx.dtype != torch.int64 or idx.shape != x.shape[:-1]:
        raise TypeError(f"idx must be int64 of shape {tuple(x.shape[:-1])}, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and data_checkable(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= nodes.shape[0]:
            raise ValueError(f"idx must be in 0..{nodes.shape[0] - 1}, got {lo}..{hi}")
    return _GatherResidual.apply(x, nodes, idx)
