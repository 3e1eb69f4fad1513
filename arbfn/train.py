"""Loss, the pure functional train step, held-out evaluation, and the training loop.

``train_step(state, batch, cfg)`` differentiates the loss with ``torch.func.grad_and_value`` with
respect to zero *probes* (one per trainable ternary weight; 0-stride, so free until autograd writes
their gradient), then turns the gradient signs into integer votes (kernels/update.py). Ephemeral float
memory: one dense gradient per weight matrix during the step, in the compute dtype (fp32: 4 bytes per logical
weight; bf16: 2, ``TrainConfig.compute_dtype``), released when the step returns; nothing float survives in the
state.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from arbfn import data as data_mod
from arbfn.config import Config, TrainConfig, UpdateConfig
from arbfn.model import State, apply_model, update_counters
from arbfn.objective import as_batch, byte_loss, objective
from arbfn.ternary import attach_probes, make_probes, update_chain_weights, update_weights, weights_with_grads
from kernels.update import flip_cutoff

Metrics = dict[str, torch.Tensor]
StepFn = Callable[[State, Any, Config], tuple[State, Metrics]]  # one training step: (state, batch, cfg) -> new, metrics
UpdateFn = Callable[[State, Any, UpdateConfig], tuple[State, Metrics]]  # (state, grads, update) -> new, counts


def loss_fn(state: State, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats of ``batch`` (ids [B, T]) under ``state``."""
    ids = as_batch(batch)["bytes"]
    return byte_loss(apply_model(state, ids), ids)


def _probed_objective(probes: Any, state: State, batch: Any, tc: TrainConfig):
    return objective(State(attach_probes(state.params, probes), state.step, state.config), batch, tc)


def gradient_signals(state: State, batch: Any, tc: TrainConfig | None = None) -> tuple[Any, torch.Tensor, dict]:
    """(dL/dW for every trainable ternary weight as a tree mirroring the params, loss, aux of the objective)."""
    tc = tc or TrainConfig()
    leaves, spec = pytree.tree_flatten(make_probes(state.params, tc.dtype))
    live = [i for i, p in enumerate(leaves) if p is not None]  # untrainable weights have no probe

    def loss_of(live_probes: list[torch.Tensor]):
        full = list(leaves)
        for i, p in zip(live, live_probes):
            full[i] = p
        return _probed_objective(pytree.tree_unflatten(full, spec), state, batch, tc)

    grads, (loss, aux) = torch.func.grad_and_value(loss_of, has_aux=True)([leaves[i] for i in live])
    full = [None] * len(leaves)
    for i, g in zip(live, grads):
        full[i] = g
    return pytree.tree_unflatten(full, spec), loss, aux


def apply_update(state: State, grads: Any, update: UpdateConfig) -> tuple[State, dict[str, torch.Tensor]]:
    """New state after one sign-vote update from ``grads``; counts of flipped trits and moved exponents.

    Stochastic and chain flips (``update.flip_mode``) draw from (update.seed, the state's step, the weight's number
    in pytree order), so the update stays a function of its inputs; their θ follows the config's schedule. Chain
    flips move no exponent."""
    step = state.step if update.flip_mode != "counter" else None
    cutoff = None if step is None else flip_cutoff(step, update.flip_threshold, update.flip_threshold_final,
                                                   update.anneal_steps, update.anneal_shape)  # once per step
    ws, gs, rebuild = weights_with_grads(state.params, grads)
    if update.flip_mode == "chain":
        new, flips = update_chain_weights(ws, gs, step, cutoff, update.chain_scale, update.chain_power, update.seed)
        moves = torch.zeros_like(flips)
    else:
        new, flips, moves = update_weights(ws, gs, update.flip_threshold, update.exp_threshold, step, update.seed,
                                           update.counter_bits, cutoff)
    return State(rebuild(new), state.step + 1, state.config), {"flips": flips, "exp_moves": moves}


def train_step(state: State, batch: torch.Tensor, cfg: Config) -> tuple[State, dict[str, torch.Tensor]]:
    """One pure training step: returns the new state and metrics as tensors (loss and its terms, flips,
    exp_moves). Ternary weights learn by sign votes; integer counters by what the forward saw."""
    if cfg.model != state.config:
        raise ValueError("train_step: cfg.model differs from the state's model config")
    if state.step.device.type == "meta":
        raise ValueError("train_step needs a state with data, got a shape-only state on the meta device "
                         "(init_model(cfg) without a generator); pass one: init_model(cfg, torch.Generator())")
    grads, loss, aux = gradient_signals(state, batch, cfg.train)
    return finish_step(state, grads, loss, aux, cfg)


def finish_step(state: State, grads: Any, loss: torch.Tensor, aux: dict[str, torch.Tensor], cfg: Config,
                update: UpdateFn = apply_update) -> tuple[State, dict[str, torch.Tensor]]:
    """The part of a step after the gradients: the weights' update (the sign votes of :func:`apply_update`, or a
    research rule's), counter learning, metrics."""
    new_state, stats = update(state, grads, cfg.update)
    new_state = update_counters(new_state, aux)
    terms = {k: v for k, v in aux.items() if v.dim() == 0}
    return new_state, {"loss": loss.detach(), **terms, **stats}


@torch.no_grad()
def evaluate(state: State, batches: list[torch.Tensor]) -> float:
    """Mean held-out loss in bits per byte over ``batches``."""
    if not batches:
        raise ValueError("evaluate needs at least one batch")
    losses = [float(loss_fn(state, b.to(state.step.device))) for b in batches]
    return sum(losses) / len(losses) / math.log(2)


def train(cfg: Config, state: State, corpus: bytes, out_dir: Path | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          step_fn: StepFn = train_step,
          ) -> tuple[State, list[dict[str, float]]]:
    """Train ``state`` for ``cfg.train.steps`` steps on ``corpus``; returns the final state and per-step metrics.

    With ``out_dir``, each step's metrics are appended to ``out_dir/metrics.jsonl`` as they happen.
    ``step_fn`` takes the place of :func:`train_step` (arbfn.distributed passes its data-parallel step).
    """
    tc = cfg.train
    train_data, held_out = data_mod.split_corpus(corpus, tc.held_out_fraction)
    batches = data_mod.iterate_batches(train_data, tc.batch_size, tc.context, tc.seed)
    eval_set = data_mod.eval_batches(held_out, tc.batch_size, tc.context)[: tc.eval_batches]
    device = state.step.device
    history: list[dict[str, float]] = []
    log = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = (out_dir / "metrics.jsonl").open("w")
    try:
        for i in range(tc.steps):
            batch = next(batches).to(device)
            t0 = time.perf_counter()
            state, m = step_fn(state, batch, cfg)
            row = {k: float(v) for k, v in m.items()}
            row.update(step=int(state.step), bytes_per_s=batch.numel() / (time.perf_counter() - t0))
            if i == tc.steps - 1 and eval_set:
                row["held_out_bpb"] = evaluate(state, eval_set)
            history.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if on_step is not None:
                on_step(i, row)
    finally:
        if log is not None:
            log.close()
    return state, history
