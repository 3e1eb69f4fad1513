"""The state audit: what a state holds, counted per area, with no float allowed in the core.

Counts over the state pytree: logical ternary weights; persistent state bytes (every tensor, packed
trits, scales, accumulators, counters) and bytes per weight; trainable float params (float tensors
among the parameters); float buffers (float tensors elsewhere in the state). Works on meta-device
states, so large presets are counted without allocating.

Sidecars (frozen encoders outside the state) are reported apart, one section each
(``sidecars.sidecar_report``): quantized module classes and counts, quantized and frozen float params with
their bytes, trainable params. The top-level counts are the core's; ``frozen_float_params`` sums the
sidecars'. Strict mode fails on any float in the core, any trainable sidecar param, and any sidecar that
was asked to be int8 and is not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from arbfn.model import State
from arbfn.ternary import weights


class AuditError(ValueError):
    """Strict audit failure: a float tensor in the core state, a trainable sidecar param, or a sidecar asked
    to be int8 that is not."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _float_count(tree: Any) -> int:
    leaves = pytree.tree_leaves(tree)
    return sum(t.numel() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def _area(tree: Any) -> dict[str, float | int]:
    n = sum(w.num_weights for w in weights(tree))
    nbytes = sum(_nbytes(t) for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))
    return {"ternary_weights": n, "state_bytes": nbytes, "state_mb": nbytes / 1e6,
            "bytes_per_weight": nbytes / n if n else 0.0, "trainable_float_params": _float_count(tree)}


def _strict_failures(report: dict[str, Any]) -> list[str]:
    problems = []
    if report["trainable_float_params"] or report["float_buffers"]:
        problems.append(f"float tensors in the core state: {report['trainable_float_params']} float params, "
                        f"{report['float_buffers']} float buffer elements")
    for name, s in report["sidecars"].items():
        if s["trainable_float_params"]:
            problems.append(f"sidecar {name}: {s['trainable_float_params']} trainable params (must be frozen)")
        if s["quantize_requested"] == "int8" and not s["quantized_int8"]:
            why = s["fallback"] or "not quantized"
            problems.append(f"sidecar {name}: int8 was requested but it is not int8 ({why})")
    return problems


def audit(state: State, strict: bool = False, sidecars: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Audit ``state`` and the loaded ``sidecars`` (name -> frozen module); with ``strict`` raise
    :class:`AuditError` on any float tensor in the core, a trainable sidecar param or a sidecar asked to be
    int8 that is not."""
    side = {}
    if sidecars:
        from sidecars import sidecar_report

        side = {name: sidecar_report(module) for name, module in sidecars.items()}
    total = _area(state.params)
    step_bytes = _nbytes(state.step)
    total["state_bytes"] += step_bytes
    total["state_mb"] = total["state_bytes"] / 1e6
    total["bytes_per_weight"] = total["state_bytes"] / total["ternary_weights"] if total["ternary_weights"] else 0.0
    report = {
        **total,
        "frozen_float_params": sum(s["frozen_float_params"] for s in side.values()),
        "float_buffers": _float_count(state.step),
        "areas": {name: _area(sub) for name, sub in state.params.items()},
        "sidecars": side,
    }
    problems = _strict_failures(report) if strict else []
    if problems:
        raise AuditError("; ".join(problems))
    return report


def format_audit(report: dict[str, Any]) -> str:
    """A plain-text table of an audit report."""
    cols = ("ternary_weights", "state_mb", "bytes_per_weight", "trainable_float_params")
    rows = [("area", "ternary weights", "state MB", "bytes/weight", "float params")]
    for name, a in [*report["areas"].items(), ("TOTAL", report)]:
        rows.append((name, f"{a[cols[0]]:,}", f"{a[cols[1]]:.3f}", f"{a[cols[2]]:.3f}", str(a[cols[3]])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"frozen float params: {report['frozen_float_params']}   float buffers: {report['float_buffers']}   "
                 f"sidecars: {len(report['sidecars'])}")
    return "\n".join([*lines, *_format_sidecars(report["sidecars"])])


def _format_sidecars(side: dict[str, dict[str, Any]]) -> list[str]:
    """One block per sidecar: its class, what quantization was asked and got, module counts, params, bytes."""
    lines = []
    for name, s in side.items():
        got = "int8" if s["quantized_int8"] else f"NOT int8: {s['fallback']}" if s["fallback"] else "float"
        modules = ", ".join(f"{k} {v}" for k, v in s["quantized_modules"].items()) or "none"
        lines += [f"sidecar {name} ({s['class']}): requested {s['quantize_requested']}, {got}",
                  f"  quantized modules: {modules}; quantized params {s['quantized_params']:,} "
                  f"({s['quantized_bytes'] / 1e6:.3f} MB)",
                  f"  frozen float params {s['frozen_float_params']:,} ({s['frozen_float_bytes'] / 1e6:.3f} MB, "
                  f"{'/'.join(s['float_dtypes']) or '-'}); float buffers {s['float_buffers']:,}; "
                  f"trainable params {s['trainable_float_params']}; tensors {s['tensors']}"]
    return lines
