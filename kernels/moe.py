"""MoE dense route-combine: ``y[n] = sum_e weights[n, e] * expert_out[e, n]``, accumulated in fp32.

Ops: ``arbfn::route_combine`` (expert_out [E, N, D], weights [N, E] -> [N, D]) and its two backward ops,
``arbfn::route_combine_bwd_expert`` (``weights[n, e] * g[n]`` -> [E, N, D]) and
``arbfn::route_combine_bwd_weights`` (``<expert_out[e, n], g[n]>`` -> [N, E]). Outputs take the dtype of
the first tensor argument. A vmap batch dim folds into the token dim N (one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable

BLOCK_N = 16
BLOCK_D = 64

# ---------------------------------------------------------------- references


def route_combine_reference(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``sum_e weights[n, e] * expert_out[e, n]`` in fp32; output in expert_out's dtype."""
    return torch.einsum("end,ne->nd", expert_out.float(), weights.float()).to(expert_out.dtype).contiguous()


def route_combine_bwd_expert_reference(g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``grad_expert[e, n] = weights[n, e] * g[n]``; output in g's dtype."""
    return (weights.float().t()[:, :, None] * g.float()[None]).to(g.dtype).contiguous()


def route_combine_bwd_weights_reference(g: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``grad_weights[n, e] = <expert_out[e, n], g[n]>`` in fp32; output in g's dtype."""
    return torch.einsum("end,nd->ne", expert_out.float(), g.float()).to(g.dtype).contiguous()


# ---------------------------------------------------------------- Triton kernels


@triton.jit(do_not_specialize=["E", "N"])  # D specialised: 16-byte row vectors where D is a multiple of 16
def _route_combine_kernel(x_ptr, w_ptr, y_ptr, E, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rn[:, None] < N) & (rd[None, :] < D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for e in range(0, E):
        w = tl.load(w_ptr + rn * E + e, mask=rn < N, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (e * N + rn[:, None]) * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * x
    tl.store(y_ptr + rn[:, None] * D + rd[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["E", "N"])  # D specialised: 16-byte row vectors where D is a multiple of 16
def _route_combine_bwd_expert_kernel(g_ptr, w_ptr, out_ptr, E, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rn[:, None] < N) & (rd[None, :] < D)
    w = tl.load(w_ptr + rn * E + e, mask=rn < N, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rn[:, None] * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (e * N + rn[:, None]) * D + rd[None, :], (w[:, None] * g).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=["E", "N"])  # D specialised: 16-byte row vectors where D is a multiple of 16
def _route_combine_bwd_weights_kernel(g_ptr, x_ptr, out_ptr, E, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.program_id(1)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        mask = (rn[:, None] < N) & (rd[None, :] < D)
        g = tl.load(g_ptr + rn[:, None] * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (e * N + rn[:, None]) * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * x, axis=1)
    tl.store(out_ptr + rn * E + e, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def route_combine_triton(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Launch the combine kernel; [E, N, D] x [N, E] -> [N, D]."""
    check_launchable(expert_out, weights)
    e, n, d = expert_out.shape
    y = torch.empty((n, d), dtype=expert_out.dtype, device=expert_out.device)
    if y.numel():
        _route_combine_kernel[(cdiv(n, BLOCK_N), cdiv(d, BLOCK_D))](
            expert_out.contiguous(), weights.contiguous(), y, e, n, d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return y


def route_combine_bwd_expert_triton(g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Launch the expert-gradient kernel; g [N, D], weights [N, E] -> [E, N, D]."""
    check_launchable(g, weights)
    (n, d), e = g.shape, weights.shape[1]
    out = torch.empty((e, n, d), dtype=g.dtype, device=g.device)
    if out.numel():
        _route_combine_bwd_expert_kernel[(e, cdiv(n, BLOCK_N), cdiv(d, BLOCK_D))](
            g.contiguous(), weights.contiguous(), out, e, n, d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out


def route_combine_bwd_weights_triton(g: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """Launch the weight-gradient kernel; g [N, D], expert_out [E, N, D] -> [N, E]."""
    check_launchable(g, expert_out)
    e, n, d = expert_out.shape
    out = torch.zeros((n, e), dtype=g.dtype, device=g.device)  # zeros: D == 0 still launches nothing
    if n and e and d:
        _route_combine_bwd_weights_kernel[(cdiv(n, BLOCK_N), e)](
            g.contiguous(), expert_out.contiguous(), out, e, n, d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::route_combine", mutates_args=())
def route_combine_op(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_e weights[n, e] * expert_out[e, n]`` -> [N, D]."""
    return route_combine_reference(expert_out, weights)


@route_combine_op.register_kernel("cuda")
def _(expert_out, weights):
    return route_combine_triton(expert_out, weights)


@route_combine_op.register_fake
def _(expert_out, weights):
    return expert_out.new_empty(expert_out.shape[1:])


@torch.library.custom_op("arbfn::route_combine_bwd_expert", mutates_args=())
def route_combine_bwd_expert(g: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights[n, e] * g[n]`` -> [E, N, D]: the gradient for the expert outputs."""
    return route_combine_bwd_expert_reference(g, weights)


@route_combine_bwd_expert.register_kernel("cuda")
def _(g, weights):
    return route_combine_bwd_expert_triton(g, weights)


@route_combine_bwd_expert.register_fake
def _(g, weights):
    return g.new_empty((weights.shape[1], *g.shape))


@torch.library.custom_op("arbfn::route_combine_bwd_weights", mutates_args=())
def route_combine_bwd_weights(g: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """``<expert_out[e, n], g[n]>`` -> [N, E]: the gradient for the routing weights."""
    return route_combine_bwd_weights_reference(g, expert_out)


@route_combine_bwd_weights.register_kernel("cuda")
def _(g, expert_out):
    return route_combine_bwd_weights_triton(g, expert_out)


@route_combine_bwd_weights.register_fake
def _(g, expert_out):
    return g.new_empty((g.shape[0], expert_out.shape[0]))


# ---------------------------------------------------------------- vmap: fold the batch into the token dim

_TOKEN_DIM = {"nd": 0, "ne": 0, "end": 1}  # where N sits in each argument/result layout


def _fold(t: torch.Tensor, dim: int | None, layout: str, batch: int) -> torch.Tensor:
    """``t`` with its vmap batch dim (expanded if absent) merged into the token dim: [.., B*N, ..]."""
    n_at = _TOKEN_DIM[layout]
    if dim is None:
        shape = t.shape
        t = t.unsqueeze(n_at).expand(*shape[:n_at], batch, *shape[n_at:])
    else:
        t = t.movedim(dim, n_at)
    return t.flatten(n_at, n_at + 1)


def _folding_rule(op, layouts: tuple[str, str], out_layout: str):
    def rule(info, in_dims, a, b):
        out = op(*(_fold(t, d, lay, info.batch_size) for t, d, lay in zip((a, b), in_dims, layouts)))
        n_at = _TOKEN_DIM[out_layout]
        return out.unflatten(n_at, (info.batch_size, -1)), n_at

    return rule


torch.library.register_vmap("arbfn::route_combine", _folding_rule(route_combine_op, ("end", "ne"), "nd"))
torch.library.register_vmap("arbfn::route_combine_bwd_expert",
                            _folding_rule(route_combine_bwd_expert, ("nd", "ne"), "end"))
torch.library.register_vmap("arbfn::route_combine_bwd_weights",
                            _folding_rule(route_combine_bwd_weights, ("nd", "end"), "ne"))


# ---------------------------------------------------------------- autograd


class _RouteCombine(torch.autograd.Function):
    """Split-style Function: forward/backward call only ops, so grad, vmap, compile and export see through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(expert_out, weights):
        return route_combine_op(expert_out, weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        expert_out, weights = inputs
        ctx.save_for_backward(expert_out, weights)

    @staticmethod
    def backward(ctx, g):
        expert_out, weights = ctx.saved_tensors
        with torch.no_grad():
            grad_x = route_combine_bwd_expert(g, weights) if ctx.needs_input_grad[0] else None
            grad_w = route_combine_bwd_weights(g, expert_out) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def route_combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Differentiable ``y[n] = sum_e weights[n, e] * expert_out[e, n]`` for expert_out [E, N, D], weights [N, E]."""
    if not (expert_out.is_floating_point() and weights.is_floating_point()):
        raise TypeError(f"route_combine needs float tensors, got {expert_out.dtype} and {weights.dtype}")
    if expert_out.dim() != 3 or weights.dim() != 2:
        raise ValueError(f"route_combine expects expert_out [E, N, D] and weights [N, E], got "
                         f"{tuple(expert_out.shape)} and {tuple(weights.shape)}")
    e, n, _ = expert_out.shape
    if tuple(weights.shape) != (n, e):
        raise ValueError(f"weights must be [N, E] = {[n, e]} to match expert_out {tuple(expert_out.shape)}, "
                         f"got {tuple(weights.shape)}")
    return _RouteCombine.apply(expert_out, weights)
