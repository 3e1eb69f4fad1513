"""Ternary 1-D convolutions as unfold + ternary linear (and its transpose as ternary linear + overlap-add).

Weight layouts (both plain [rows, columns] ternary matrices, so the linear op, its probe and the update
apply unchanged):

- ``conv1d``: ``w`` is [c_out, c_in * k] with column ``ci * k + j`` holding ``W[co, ci, j]`` of
  ``F.conv1d``'s [c_out, c_in, k] weight (i.e. ``W.reshape(c_out, c_in * k)``).
- ``conv_transpose1d``: ``w`` is [c_out * k, c_in] with row ``co * k + j`` holding ``W[ci, co, j]`` of
  ``F.conv_transpose1d``'s [c_in, c_out, k] weight (i.e. ``W.permute(1, 2, 0).reshape(c_out * k, c_in)``):
  each input position's linear output is the c_out * k contributions it scatters onto the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arbfn.ternary import TernaryWeight, init_ternary, linear


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_input(x: torch.Tensor, channels: int | None, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} expects a floating-point tensor [B, C_in, L], got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 3:
        raise ValueError(f"{what} expects input [B, C_in, L], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{what} expects {channels} input channels, got shape {tuple(x.shape)}")


def init_conv1d(c_in: int, c_out: int, kernel_size: int, group_size: int, generator: torch.Generator | None
                ) -> dict[str, TernaryWeight]:
    """``{"w": [c_out, c_in * kernel_size]}`` (fan-in scaled like a linear of c_in * kernel_size inputs)."""
    _check_positive(c_in=c_in, c_out=c_out, kernel_size=kernel_size)
    return {"w": init_ternary(c_out, c_in * kernel_size, group_size, generator)}


def conv1d(p: dict[str, TernaryWeight], x: torch.Tensor, stride: int = 1, padding: int = 0, dilation: int = 1
           ) -> torch.Tensor:
    """``F.conv1d(x, W, stride, padding, dilation)`` for x [B, C_in, L] -> [B, C_out, L_out], no bias.

    The kernel size is ``w.in_features // C_in`` (the layout above), so C_in must divide the weight's columns.
    """
    w = p["w"]
    _check_input(x, None, "conv1d")
    _check_positive(stride=stride, dilation=dilation)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    c_in = x.shape[1]
    if c_in < 1 or w.in_features % c_in:
        raise ValueError(f"conv1d weight has {w.in_features} columns (c_in * k); {c_in} input channels do not divide it")
    k = w.in_features // c_in
    span = dilation * (k - 1) + 1
    if x.shape[2] + 2 * padding < span:
        raise ValueError(f"conv1d input of length {x.shape[2]} (padding {padding}) is shorter than the kernel span {span}")
    windows = F.pad(x, (padding, padding)).unfold(2, span, stride)[..., ::dilation]  # [B, C_in, L_out, k]
    cols = windows.permute(0, 2, 1, 3).reshape(x.shape[0], windows.shape[2], c_in * k)
    return linear(w, cols).transpose(1, 2)


def init_conv_transpose1d(c_in: int, c_out: int, kernel_size: int, group_size: int,
                          generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """``{"w": [c_out * kernel_size, c_in]}`` (fan-in c_in: each output column sums about c_in * k / stride terms)."""
    _check_positive(c_in=c_in, c_out=c_out, kernel_size=kernel_size)
    return {"w": init_ternary(c_out * kernel_size, c_in, group_size, generator)}


def conv_transpose1d(p: dict[str, TernaryWeight], x: torch.Tensor, stride: int = 1, padding: int = 0,
                     output_padding: int = 0, *, kernel_size: int) -> torch.Tensor:
    """``F.conv_transpose1d(x, W, stride, padding, output_padding)`` for x [B, C_in, L] -> [B, C_out, L_out].

    ``kernel_size`` is required: the weight's c_out * k rows do not say how they split.
    """
    w = p["w"]
    _check_input(x, w.in_features, "conv_transpose1d")
    _check_positive(stride=stride, kernel_size=kernel_size)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if not isinstance(output_padding, int) or not 0 <= output_padding < stride:
        raise ValueError(f"output_padding must be an int in [0, stride = {stride}), got {output_padding!r}")
    if w.out_features % kernel_size:
        raise ValueError(f"conv_transpose1d weight has {w.out_features} rows, not a multiple of kernel_size {kernel_size}")
    b, length = x.shape[0], x.shape[2]
    full = (length - 1) * stride + kernel_size + output_padding
    l_out = full - 2 * padding
    if length < 1 or l_out < 1:
        raise ValueError(f"conv_transpose1d of length {length} gives output length {l_out} (padding {padding})")
    cols = linear(w, x.transpose(1, 2)).transpose(1, 2)  # [B, c_out * k, L]: row co * k + j, one column per input
    out = F.fold(cols, output_size=(1, full), kernel_size=(1, kernel_size), stride=(1, stride))  # overlap-add
    return out.reshape(b, w.out_features // kernel_size, full)[..., padding:padding + l_out]
