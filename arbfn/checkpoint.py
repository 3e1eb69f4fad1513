"""Checkpoints: the state pytree as safetensors, validated on load, written atomically.

Layout: one tensor per pytree leaf, named by its path (``params.blocks.0.attn.q.packed``); metadata
holds the format tag, the run config as JSON, and a SHA-256 over every tensor's bytes (safetensors has
no checksum of its own, so a flipped byte would otherwise load silently). Loading rebuilds the
expected structure from the config on the meta device and demands exactly those names, dtypes and
shapes, then validates every ternary weight (bytes 0..242, zero padding trits). The per-weight flip
counters (``t_accum``) are saved and expected exactly when the config's ``update.flip_mode`` is "counter", in
the width of its ``update.counter_bits`` (int8, or uint8 nibble pairs); counters of the other width refuse to
save or load. A "chain" config saves and expects the chain's place bits (int16 ``t_accum``) and no exponent
accumulators; ``update.fixed_norm_gains`` saves and expects no accumulator on any norm gain.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.utils._pytree as pytree

from arbfn.config import Config, TrainConfig, UpdateConfig
from arbfn.model import State, init_model, is_norm_gain
from arbfn.ternary import (CHAIN_BITS, fix_weights, flip_counter_bits, is_ternary, set_chain_places,
                           set_flip_counters, to_device, validate_weight, weights)

FORMAT = "arbfn-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, truncated, corrupted, or of another model."""


def _leaf_name(path: tuple) -> str:
    return pytree.keystr(path).replace("[", ".").replace("]", "").replace("'", "").lstrip(".")


def _named_leaves(state: State) -> dict[str, torch.Tensor]:
    leaves, _ = pytree.tree_flatten_with_path(state)
    return {_leaf_name(path): leaf for path, leaf in leaves if leaf is not None}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(state: State, path: str | Path, cfg: Config | None = None) -> Path:
    """Write ``state`` (with its run config) to ``path`` atomically: temp file in the same folder, fsync, rename.

    The state is written in the layout of ``cfg.update.flip_mode`` (flip counters dropped, or added as zeros of
    ``cfg.update.counter_bits``; counters of another width raise ValueError); without ``cfg`` the mode and width
    are the state's own: "stochastic" when no trainable weight carries flip counters, 4-bit (with flip threshold
    7, the most a nibble holds) when they are nibbles, "chain" when they are a chain's place bits, with
    ``fixed_norm_gains`` when every norm gain holds no accumulator. A config with ``fixed_norm_gains`` drops the norm
    gains' accumulators; one without refuses a state whose norm gains have none (their votes cannot be made up)."""
    gains = [w for path, w in pytree.tree_flatten_with_path(state.params, is_leaf=is_ternary)[0]
             if is_ternary(w) and is_norm_gain(path)]
    fixed = bool(gains) and not any(w.trainable for w in gains)
    if cfg is None:  # the default train context (64) must fit models with a shorter max_context
        trainable = [w for w in weights(state.params) if w.trainable]
        bits = {flip_counter_bits(w) for w in trainable}
        mode = ("stochastic" if trainable and bits == {None} else "chain" if CHAIN_BITS in bits else "counter")
        update = (UpdateConfig(flip_threshold=7, counter_bits=4, fixed_norm_gains=fixed) if 4 in bits
                  else UpdateConfig(flip_mode=mode, fixed_norm_gains=fixed))
        cfg = Config("custom", state.config, update=update,
                     train=TrainConfig(context=max(2, min(TrainConfig.context, state.config.max_context))))
    if cfg.model != state.config:
        raise ValueError("save: cfg.model differs from the state's model config")
    if cfg.update.fixed_norm_gains:
        state = fix_weights(state, is_norm_gain)
    elif fixed:
        raise ValueError("save: the state's norm gains hold no accumulators (fixed_norm_gains), the config trains "
                         "them: pass a config with update.fixed_norm_gains=True")
    if cfg.update.flip_mode == "chain":
        state = set_chain_places(state)
    else:
        state = set_flip_counters(state, cfg.update.flip_counters, cfg.update.counter_bits)
    for w in weights(state.params):
        validate_weight(w)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _named_leaves(state).items()}
    meta = {"format": FORMAT, "config": cfg.to_json(), "sha256": _digest(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_config(path: str | Path) -> Config:
    """The run config stored in a checkpoint."""
    return _read(path)[1]


def load(path: str | Path, device: torch.device | str = "cpu") -> State:
    """Read and validate a checkpoint; the state on ``device``."""
    return load_run(path, device)[0]


def load_run(path: str | Path, device: torch.device | str = "cpu") -> tuple[State, Config]:
    """Read and validate a checkpoint; returns (state on ``device``, run config)."""
    tensors, cfg = _read(path)
    expected = init_model(cfg)  # meta skeleton in the config's layout: names, dtypes, shapes
    names = _named_leaves(expected)
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the {cfg.name!r} model "
                              f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for name, like in names.items():
        t = tensors[name]
        if name.endswith(".t_accum") and t.dtype != like.dtype:
            raise CheckpointError(f"{path}: {name} holds {t.dtype} flip counters, but the checkpoint's config says "
                                  f"update.counter_bits={cfg.update.counter_bits} ({like.dtype}): a checkpoint loads "
                                  "only in the counter width it was saved with")
        if t.dtype != like.dtype or t.shape != like.shape:
            raise CheckpointError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, expected {like.dtype} {tuple(like.shape)}")
    leaves, spec = pytree.tree_flatten_with_path(expected)
    filled = [None if leaf is None else tensors[_leaf_name(path)] for path, leaf in leaves]
    state = to_device(pytree.tree_unflatten(filled, spec), device)
    try:
        for w in weights(state.params):
            validate_weight(w)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return state, cfg


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise CheckpointError(f"{path} is truncated or not a safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an arbfn checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    if _digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its tensor bytes do not match the stored SHA-256")
    try:
        cfg = Config.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config in metadata: {e}") from None
    return tensors, cfg
