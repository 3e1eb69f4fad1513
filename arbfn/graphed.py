"""A train step captured as one CUDA graph and replayed: the compiled step without its host overhead.

The compiled step (arbfn/compiled.py) spends more host time than GPU time on the small preset: on an H200 its
byte path issued 8 ms of kernels per step but took 48 ms, most of it launching custom ops and the per-weight
update one by one (benchmarks/RESULTS.md, "Where the train step's time goes"). A CUDA graph records every
launch of one step once (forward, backward, the sign-vote update of every weight, the counters) and replays
them with a single host call.

The step stays a pure function of (state, batch): each call copies the state's and batch's tensors into the
graph's static inputs, replays, and returns *copies* of the graph's outputs, so a caller may keep any earlier
state (the next replay overwrites only the graph's own buffers). One graph is captured per input structure
(the pytree layout and every tensor's shape, dtype and device); the first call of a structure runs three
warm-up steps first (compiles, cuBLAS workspaces, Triton autotuning happen there, outside the capture).

What a graph cannot do: run host work per step. So the step must be free of host syncs (the compiled
objective with fixed-step halting loops is), the batch's id range is not checked per call (as in the compiled
step, whose traced graph skips that check), and the MoE must take its dense dispatch (B*T <= moe.dense_limit),
whose shapes do not depend on the data. CUDA only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from arbfn.config import Config
from arbfn.model import State
from arbfn.objective import as_batch

Step = Callable[[State, Any], tuple[State, dict[str, torch.Tensor]]]
WARMUP_STEPS = 3


def _structure(tree: Any) -> tuple:
    """A hashable key of ``tree``'s layout: its pytree spec and each tensor leaf's shape, dtype and device."""
    leaves, spec = pytree.tree_flatten(tree)
    return str(spec), tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _copies(tree: Any) -> Any:
    """``tree`` with every tensor leaf cloned (the graph's outputs are overwritten by the next replay)."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


class _Captured:
    """One captured step: static inputs, the graph, and the static outputs it writes."""

    def __init__(self, step: Step, state: State, batch: Any) -> None:
        self.inputs = _copies((state, batch))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*self.inputs)

    def __call__(self, state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        torch._foreach_copy_(_tensors(self.inputs), _tensors((state, batch)))
        self.graph.replay()
        return _copies(self.outputs)


class GraphedTrainStep:
    """``step(state, batch) -> (new_state, metrics)``: ``step_fn`` (default: a fresh
    :class:`arbfn.compiled.CompiledTrainStep` of ``cfg``) captured as a CUDA graph per input structure."""

    def __init__(self, cfg: Config, step_fn: Step | None = None) -> None:
        if step_fn is None:
            from arbfn.compiled import CompiledTrainStep

            step_fn = CompiledTrainStep(cfg)
        self.cfg = cfg
        self._step = step_fn
        self._graphs: dict[tuple, _Captured] = {}

    @property
    def captured(self) -> int:
        """How many input structures have a graph."""
        return len(self._graphs)

    def __call__(self, state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        if self.cfg.model != state.config:
            raise ValueError("GraphedTrainStep: the state's model config differs from the step's")
        moe = self.cfg.model.moe
        tokens = as_batch(batch)["bytes"].numel()
        if self.cfg.model.enable_moe and tokens > moe.dense_limit:
            raise ValueError(f"GraphedTrainStep needs the MoE's dense dispatch: the batch has {tokens} ids, above "
                             f"moe.dense_limit {moe.dense_limit} (the sparse dispatch's shapes depend on the data)")
        devices = {t.device for t in _tensors((state, batch))}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedTrainStep needs the state and the batch on one CUDA device, got "
                             f"{', '.join(sorted(map(str, devices))) or 'no tensors'}")
        key = _structure((state, batch))
        if key not in self._graphs:
            with torch.cuda.device(next(iter(devices))):
                self._graphs[key] = _Captured(self._step, state, batch)
        return self._graphs[key](state, batch)
