"""A compiled train step: the objective (forward with fixed-step halting loops, all loss terms) runs as
one ``torch.compile(fullgraph=True)`` graph with its AOTAutograd backward; the sign-vote update and the
counter learning run after it as in :func:`arbfn.train.train_step`.

Gradients are taken with ``torch.autograd.grad`` *outside* the compiled function: on torch 2.13
``torch.compile(torch.func.grad(f))`` silently returns zero probe gradients and
``torch.func.grad(torch.compile(f))`` is unsupported (kernels/__init__.py). The step is still a function of
(state, batch) only: the probes are fresh zero leaves made inside each call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from arbfn.config import Config
from arbfn.model import State
from arbfn.objective import objective
from arbfn.ternary import attach_probes, make_probes
from arbfn.train import finish_step


def with_dense_moe(cfg: Config, tokens: int) -> Config:
    """``cfg`` whose MoE takes its dense dispatch for batches of up to ``tokens`` ids (``moe.dense_limit`` raised
    to it): the sparse dispatch's result (SYSTEM.md "MoE") with shapes that do not depend on the data, which a
    ``fullgraph`` compile and a CUDA graph need."""
    moe = dataclasses.replace(cfg.model.moe, dense_limit=max(cfg.model.moe.dense_limit, tokens))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


class CompiledTrainStep:
    """``step(state, batch) -> (new_state, metrics)`` for one config, compiled on first use per batch shape.

    The MoE's sparse dispatch (``B*T > moe.dense_limit``) is data-dependent; with ``fullgraph=True`` such
    batches fail to trace, so pass ``fullgraph=False`` to let them break the graph there.
    """

    def __init__(self, cfg: Config, fullgraph: bool = True):
        self.cfg = cfg
        self.objective = torch.compile(self._probed_objective, fullgraph=fullgraph)
        """``objective(probes, state, batch) -> (loss, aux)``, compiled: the forward half of a step (with
        :meth:`probes` and :meth:`probe_gradients`, the phases benchmarks/profile_step.py times apart)."""

    def _probed_objective(self, probes: Any, state: State, batch: Any):
        probed = State(attach_probes(state.params, probes), state.step, state.config)
        return objective(probed, batch, self.cfg.train, fixed_loops=True)

    def probes(self, state: State) -> Any:
        """Fresh zero probe leaves (in the compute dtype) that require grad: made per call, so the step stays a
        function of (state, batch)."""
        return pytree.tree_map(lambda p: None if p is None else p.detach().requires_grad_(),
                               make_probes(state.params, self.cfg.train.dtype))

    @staticmethod
    def probe_gradients(loss: torch.Tensor, probes: Any) -> Any:
        """The tree of ``dloss/dprobe`` for the live ``probes`` (None where a weight has no probe)."""
        leaves, spec = pytree.tree_flatten(probes)
        live = [p for p in leaves if p is not None]
        got = iter(torch.autograd.grad(loss, live, allow_unused=True))
        return pytree.tree_unflatten([None if p is None else next(got) for p in leaves], spec)

    def __call__(self, state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        if self.cfg.model != state.config:
            raise ValueError("CompiledTrainStep: the state's model config differs from the step's")
        probes = self.probes(state)
        loss, aux = self.objective(probes, state, batch)
        return finish_step(state, self.probe_gradients(loss, probes), loss, aux, self.cfg)
