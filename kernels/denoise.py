"""VideoHead denoise step: ``out = (latent - (1 - alpha) * pred_noise) / sqrt(alpha)``, one alpha per item.

Ops: ``arbfn::denoise_fwd`` (latent [B, ...], pred_noise [B, ...], alpha [B] -> out [B, ...]) and
``arbfn::denoise_bwd`` (g -> (dL/dlatent, dL/dpred_noise)). The Triton kernels treat each item as a
flat row and read its alpha once. Arithmetic is fp32; outputs take the latent's (or g's) dtype.

``alpha`` is a fixed schedule value, not a learned one: :func:`denoise_step` returns no gradient for
it (``alpha.grad`` stays None even when it requires grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import cdiv, check_launchable
from kernels._vmap import data_checkable

BLOCK = 1024

# ---------------------------------------------------------------- references


def _per_item(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha [B] as fp32 [B, 1, ..., 1] broadcasting against ``like``."""
    return alpha.to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def denoise_fwd_reference(latent: torch.Tensor, pred_noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Pure-torch forward in fp32; output in latent's dtype."""
    a = _per_item(alpha, latent)
    return ((latent.to(torch.float32) - (1 - a) * pred_noise.to(torch.float32)) / torch.sqrt(a)).to(latent.dtype)


def denoise_bwd_reference(g: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``(g / sqrt(alpha), -(1 - alpha) * g / sqrt(alpha))`` in fp32; outputs in g's dtype."""
    a = _per_item(alpha, g)
    g32, s = g.to(torch.float32), torch.sqrt(a)
    return (g32 / s).to(g.dtype), (-((1 - a) * g32) / s).to(g.dtype)


# ---------------------------------------------------------------- Triton kernels


@triton.jit(do_not_specialize=["N"])  # sizes vary per call: one compile, not one per size
def _denoise_fwd_kernel(x_ptr, n_ptr, a_ptr, out_ptr, N, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + b).to(tl.float32)
    x = tl.load(x_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    out = (x - (1 - a) * n) / tl.sqrt_rn(a)
    tl.store(out_ptr + b * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _denoise_bwd_kernel(g_ptr, a_ptr, gx_ptr, gn_ptr, N, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + b).to(tl.float32)
    s = tl.sqrt_rn(a)
    g = tl.load(g_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + b * N + offs, (g / s).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gn_ptr + b * N + offs, (-((1 - a) * g) / s).to(gn_ptr.dtype.element_ty), mask=mask)


def denoise_fwd_triton(latent: torch.Tensor, pred_noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: one program row per item, ``BLOCK`` elements per program."""
    check_launchable(latent, pred_noise, alpha)
    out = torch.empty_like(latent, memory_format=torch.contiguous_format)
    if out.numel():
        n = out[0].numel()
        _denoise_fwd_kernel[(latent.shape[0], cdiv(n, BLOCK))](
            latent.contiguous(), pred_noise.contiguous(), alpha.contiguous(), out, n, BLOCK=BLOCK)
    return out


def denoise_bwd_triton(g: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: both input gradients in one pass over ``g``."""
    check_launchable(g, alpha)
    gx = torch.empty_like(g, memory_format=torch.contiguous_format)
    gn = torch.empty_like(gx)
    if g.numel():
        n = g[0].numel()
        _denoise_bwd_kernel[(g.shape[0], cdiv(n, BLOCK))](g.contiguous(), alpha.contiguous(), gx, gn, n, BLOCK=BLOCK)
    return gx, gn


# ---------------------------------------------------------------- ops


@torch.library.custom_op("arbfn::denoise_fwd", mutates_args=())
def denoise_fwd(latent: torch.Tensor, pred_noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(latent - (1 - alpha) * pred_noise) / sqrt(alpha)`` with alpha [B] broadcast per item."""
    return denoise_fwd_reference(latent, pred_noise, alpha)


@denoise_fwd.register_kernel("cuda")
def _(latent, pred_noise, alpha):
    return denoise_fwd_triton(latent, pred_noise, alpha)


@denoise_fwd.register_fake
def _(latent, pred_noise, alpha):
    return torch.empty_like(latent, memory_format=torch.contiguous_format)


@torch.library.custom_op("arbfn::denoise_bwd", mutates_args=())
def denoise_bwd(g: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the denoise step for latent and pred_noise."""
    return denoise_bwd_reference(g, alpha)


@denoise_bwd.register_kernel("cuda")
def _(g, alpha):
    return denoise_bwd_triton(g, alpha)


@denoise_bwd.register_fake
def _(g, alpha):
    gx = torch.empty_like(g, memory_format=torch.contiguous_format)
    return gx, torch.empty_like(gx)


def _fold(info, in_dims, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Fold the vmap dim into the item dim: every tensor becomes [V*B, ...] (unbatched ones are expanded)."""
    out = []
    for t, d in zip(tensors, in_dims):
        t = t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        out.append(t.reshape(-1, *t.shape[2:]))
    return out


def _fwd_vmap(info, in_dims, latent, pred_noise, alpha):
    v = info.batch_size
    out = denoise_fwd(*_fold(info, in_dims, (latent, pred_noise, alpha)))
    return out.reshape(v, -1, *out.shape[1:]), 0


def _bwd_vmap(info, in_dims, g, alpha):
    v = info.batch_size
    gx, gn = denoise_bwd(*_fold(info, in_dims, (g, alpha)))
    return (gx.reshape(v, -1, *gx.shape[1:]), gn.reshape(v, -1, *gn.shape[1:])), (0, 0)


torch.library.register_vmap("arbfn::denoise_fwd", _fwd_vmap)
torch.library.register_vmap("arbfn::denoise_bwd", _bwd_vmap)


# ---------------------------------------------------------------- autograd


class _DenoiseStep(torch.autograd.Function):
    """Split-style Function over the two ops; alpha gets no gradient (a fixed schedule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(latent, pred_noise, alpha):
        return denoise_fwd(latent, pred_noise, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, g):
        (alpha,) = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None
        with torch.no_grad():
            gx, gn = denoise_bwd(g, alpha)
        return (gx if ctx.needs_input_grad[0] else None), (gn if ctx.needs_input_grad[1] else None), None


def denoise_step(latent: torch.Tensor, pred_noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Differentiable ``(latent - (1 - alpha) * pred_noise) / sqrt(alpha)``; alpha [B] in (0, 1], one per item."""
    if not (latent.is_floating_point() and pred_noise.is_floating_point() and alpha.is_floating_point()):
        raise TypeError("denoise_step needs floating latent, pred_noise and alpha, got "
                        f"{latent.dtype}, {pred_noise.dtype}, {alpha.dtype}")
    if latent.dim() < 1 or pred_noise.shape != latent.shape or pred_noise.dtype != latent.dtype:
        raise ValueError(f"pred_noise must match latent [B, ...]: got {pred_noise.dtype} {tuple(pred_noise.shape)} "
                         f"and {latent.dtype} {tuple(latent.shape)}")
    if alpha.shape != latent.shape[:1]:
        raise ValueError(f"alpha must be [B] = {tuple(latent.shape[:1])}, got {tuple(alpha.shape)}")
    if data_checkable(alpha) and not bool(((alpha > 0) & (alpha <= 1)).all()):
        raise ValueError("alpha must lie in (0, 1]")
    return _DenoiseStep.apply(latent, pred_noise, alpha)
