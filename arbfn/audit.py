"""The state audit: what a state holds, counted per area, with no float allowed in the core.

Counts over the state pytree: logical ternary weights; persistent state bytes (every tensor, packed
trits, scales, accumulators, counters) and bytes per weight; trainable float params (float tensors
among the parameters); float buffers (float tensors elsewhere in the state). Frozen float params and
sidecars are reported apart (none yet: sidecars arrive with the multimodal path). Works on meta-device
states, so large presets are counted without allocating.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from arbfn.model import State
from arbfn.ternary import is_ternary, weights


class AuditError(ValueError):
    """Strict audit failure: a float tensor in the core state."""


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


def audit(state: State, strict: bool = False) -> dict[str, Any]:
    """Audit ``state``; with ``strict`` raise :class:`AuditError` on any float tensor in the core."""
    total = _area(state.params)
    step_bytes = _nbytes(state.step)
    total["state_bytes"] += step_bytes
    total["state_mb"] = total["state_bytes"] / 1e6
    total["bytes_per_weight"] = total["state_bytes"] / total["ternary_weights"] if total["ternary_weights"] else 0.0
    report = {
        **total,
        "frozen_float_params": 0,
        "float_buffers": _float_count(state.step),
        "areas": {name: _area(sub) for name, sub in state.params.items()},
        "sidecars": {},
    }
    if strict and (report["trainable_float_params"] or report["float_buffers"]):
        raise AuditError(f"float tensors in the core state: {report['trainable_float_params']} float params, "
                         f"{report['float_buffers']} float buffer elements")
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
    return "\n".join(lines)
