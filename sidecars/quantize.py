"""Load a frozen sidecar from a local folder, quantize its weights to int8 with optimum-quanto, and report it.

:func:`load_frozen` checks the folder, loads the *float* checkpoint, quantizes (``quantize(model,
weights=qint8)`` + ``freeze``), then freezes every parameter (``requires_grad=False``, ``eval()``). It sets
metadata flags on the module that say what was asked and what happened:

- ``_arb_quantize_requested``: ``"int8"`` or ``None`` (frozen float, quantization not asked for);
- ``_arb_quantized`` / ``_arb_quantized_int8``: whether quanto quantized it, and to int8;
- ``_arb_quantize_fallback``: ``None``, or why it fell back to frozen bf16 (quanto missing or failing).

A fallback is never silent: the flags say so and :func:`sidecar_report` (the audit) shows it. A quantized
sidecar is never saved (DESIGN.md §7: quanto's save/load gave NaNs and ``save_pretrained`` dropped the
quantized weights); the float checkpoint is the only thing on disk.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QUANTIZE_CHOICES = ("int8", None)


def require_folder(folder: str | Path, what: str, hint: str) -> Path:
    """``folder`` as a Path if it holds a config.json and safetensors/bin weights; else a FileNotFoundError
    that names the folder, what belongs there (``what``) and how to make it (``hint``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"sidecar folder {path} does not exist: put {what} there ({hint})")
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not (path / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"sidecar folder {path} lacks config.json or weights (*.safetensors): put {what} "
                                f"there ({hint})")
    return path


def _quanto_int8(model: nn.Module) -> None:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)


def _mark(model: nn.Module, requested: str | None, quantized: bool, fallback: str | None) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model._arb_quantize_requested = requested
    model._arb_quantized = quantized
    model._arb_quantized_int8 = quantized and requested == "int8"
    model._arb_quantize_fallback = fallback
    return model


def load_frozen(load: Callable[[], nn.Module], quantize_weights: str | None = "int8",
                device: torch.device | str | None = None) -> nn.Module:
    """``load()`` (a float model from its folder) on ``device``, int8-quantized and frozen, with the flags set.

    If optimum-quanto cannot be imported or fails, the float model is loaded again and frozen in bf16,
    with ``_arb_quantize_fallback`` saying why. ``quantize_weights=None`` freezes the float model as is.
    """
    if quantize_weights not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize_weights must be one of {QUANTIZE_CHOICES}, got {quantize_weights!r}")
    model = load().to(device)
    if quantize_weights is None:
        return _mark(model, None, False, None)
    try:
        _quanto_int8(model)
    except Exception as e:  # noqa: BLE001 - any quanto failure falls back, and the flags record why
        what = "is not importable" if isinstance(e, ImportError) else "failed"
        reason = f"optimum-quanto {what} ({type(e).__name__}: {e}); frozen bf16 instead"
        return _mark(load().to(device=device, dtype=torch.bfloat16), quantize_weights, False, reason)
    return _mark(model, quantize_weights, True, None)


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes actually held: a quanto tensor holds int8 data and float scales, not ``numel * 4``."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def sidecar_report(model: nn.Module) -> dict[str, Any]:
    """The audit of one sidecar: flags, quantized module classes and counts, quantized / frozen float
    parameters (elements and bytes), trainable parameters, float buffers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"a sidecar is an nn.Module, got {type(model).__name__}")
    modules = Counter(type(m).__name__ for m in model.modules() if getattr(m, "weight_qtype", None) is not None)
    params = list(model.parameters())
    quantized = [p for p in params if is_traceable_wrapper_subclass(p)]
    frozen_float = [p for p in params if not is_traceable_wrapper_subclass(p) and p.is_floating_point()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return {
        "class": type(model).__name__,
        "quantize_requested": getattr(model, "_arb_quantize_requested", None),
        "quantized": bool(getattr(model, "_arb_quantized", False)),
        "quantized_int8": bool(getattr(model, "_arb_quantized_int8", False)),
        "fallback": getattr(model, "_arb_quantize_fallback", None),
        "quantized_modules": dict(sorted(modules.items())),
        "quantized_params": sum(p.numel() for p in quantized),
        "quantized_bytes": sum(_storage_bytes(p) for p in quantized),
        "frozen_float_params": sum(p.numel() for p in frozen_float if not p.requires_grad),
        "frozen_float_bytes": sum(_storage_bytes(p) for p in frozen_float if not p.requires_grad),
        "float_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in frozen_float}),
        "trainable_float_params": sum(p.numel() for p in params if p.requires_grad),
        "float_buffers": sum(b.numel() for b in buffers),
        "tensors": len(params) + len(list(model.buffers())),
    }
