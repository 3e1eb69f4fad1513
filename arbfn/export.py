"""AOT-compiled inference: the whole model forward as an AOTInductor ``.pt2`` package.

:func:`export_model` wraps a state in an ``nn.Module`` (its integer leaves as buffers) whose forward is
``arbfn.model.forward(..., fixed_loops=True).logits`` — fixed-step halting loops, the MoE dense dispatch
(``batch_size * seq_len <= moe.dense_limit``) and the graph's all-node projection (its branch while
tracing), so nothing in the graph depends on data — then ``torch.export`` + AOTInductor. The package is
compiled for one static input shape ``[batch_size, seq_len]`` int64 (memory starts empty: no carry).
Metadata (format tag, model config JSON, shape, dtypes) lives inside the package, in AOTInductor's own
string metadata (``aot_inductor.metadata``), and is checked by :func:`load_compiled`.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import kernels  # noqa: F401  the package calls the arbfn ops by name: register them before loading
from arbfn.config import ModelConfig
from arbfn.model import State, forward

FORMAT = "arbfn-aoti-1"
_META_KEY = "arbfn"
INPUT_DTYPE, OUTPUT_DTYPE = torch.int64, torch.float32


class CompiledModelError(ValueError):
    """A compiled package that cannot be loaded: missing, truncated, corrupted, or not an arbfn export."""


class _Inference(torch.nn.Module):
    """Token ids [B, T] -> byte logits [B, T, vocab]; the state's tensors are buffers, its config static."""

    def __init__(self, state: State):
        super().__init__()
        leaves, self._spec = pytree.tree_flatten(state)
        self._present = [leaf is not None for leaf in leaves]
        for i, leaf in enumerate(leaves):
            if leaf is not None:
                self.register_buffer(f"leaf{i}", leaf.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        leaves = [getattr(self, f"leaf{i}") if present else None for i, present in enumerate(self._present)]
        return forward(pytree.tree_unflatten(leaves, self._spec), ids, fixed_loops=True).logits


def export_model(state: State, batch_size: int, seq_len: int, path: str | Path) -> Path:
    """Compile ``state``'s forward for ids of shape [batch_size, seq_len] into the AOTInductor package ``path``."""
    cfg = state.config
    if batch_size < 1 or not 1 <= seq_len <= cfg.max_context:
        raise ValueError(f"export needs batch_size >= 1 and 1 <= seq_len <= max_context ({cfg.max_context}), "
                         f"got {batch_size}, {seq_len}")
    if cfg.enable_moe and batch_size * seq_len > cfg.moe.dense_limit:
        raise ValueError(f"batch_size * seq_len = {batch_size * seq_len} exceeds moe.dense_limit "
                         f"({cfg.moe.dense_limit}): the sparse MoE dispatch has data-dependent shapes and cannot export")
    device = state.step.device
    ids = torch.zeros(batch_size, seq_len, dtype=INPUT_DTYPE, device=device)
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
            "batch_size": batch_size, "seq_len": seq_len, "input_dtype": str(INPUT_DTYPE),
            "output_dtype": str(OUTPUT_DTYPE), "device": device.type}
    with torch.no_grad():
        ep = torch.export.export(_Inference(state).eval(), (ids,))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs={"aot_inductor.metadata": {_META_KEY: json.dumps(meta)}})
    return Path(out)


@dataclasses.dataclass
class CompiledModel:
    """A loaded package: call it with ids [batch_size, seq_len] int64 for byte logits [B, T, vocab] fp32."""

    runner: object
    config: ModelConfig
    batch_size: int
    seq_len: int
    device: torch.device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Validate ``ids`` against the compiled shape, dtype and vocabulary, then run the package."""
        want = (self.batch_size, self.seq_len)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"compiled model takes a tensor of token ids, got {type(ids).__name__}")
        if ids.dtype != INPUT_DTYPE or tuple(ids.shape) != want:
            raise ValueError(f"compiled model expects ids of shape {list(want)} and dtype {INPUT_DTYPE}, "
                             f"got shape {list(ids.shape)} and dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got range {lo}..{hi}")
        with torch.no_grad():
            return self.runner(ids.to(self.device).contiguous())


def load_compiled(path: str | Path) -> CompiledModel:
    """Load and validate a package written by :func:`export_model`."""
    path = Path(path)
    if not path.is_file():
        raise CompiledModelError(f"no compiled model at {path}")
    if not zipfile.is_zipfile(path):
        raise CompiledModelError(f"{path} is truncated or not an AOTInductor package (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # CRC of every member: catches flipped bytes before the loader maps the .so
        if bad is not None:
            raise CompiledModelError(f"{path} is corrupted: member {bad} fails its CRC check")
        runner = torch._inductor.aoti_load_package(str(path))
        raw = runner.get_metadata().get(_META_KEY)
    except CompiledModelError:
        raise
    except Exception as e:  # the loader raises RuntimeError / zipfile / OSError flavours
        raise CompiledModelError(f"{path} cannot be loaded as an AOTInductor package: {e}") from None
    if raw is None:
        raise CompiledModelError(f"{path} is an AOTInductor package without arbfn metadata (not written by export_model)")
    try:
        meta = json.loads(raw)
        if meta["format"] != FORMAT:
            raise CompiledModelError(f"{path} has format {meta['format']!r}, expected {FORMAT!r}")
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        if meta["input_dtype"] != str(INPUT_DTYPE) or meta["output_dtype"] != str(OUTPUT_DTYPE):
            raise CompiledModelError(f"{path} was compiled for dtypes {meta['input_dtype']} -> {meta['output_dtype']}, "
                                     f"this loader handles {INPUT_DTYPE} -> {OUTPUT_DTYPE}")
        return CompiledModel(runner, config, int(meta["batch_size"]), int(meta["seq_len"]), torch.device(meta["device"]))
    except CompiledModelError:
        raise
    except (TypeError, KeyError, ValueError) as e:
        raise CompiledModelError(f"{path} is not an arbfn export (missing or unreadable metadata: {e!r})") from None
