"""A train step captured as one CUDA graph and replayed: the compiled step without its host overhead.

The compiled step (arbfn/compiled.py) spends more host time than GPU time on the small preset: on an H200 its
byte path issued 8 ms of kernels per step but took 48 ms, most of it launching custom ops and the per-weight
update one by one (benchmarks/RESULTS.md, "Train step in one CUDA graph"). A CUDA graph records every
launch of one step once (forward, backward, the sign-vote update of every weight, the counters) and replays
them with a single host call.

The step stays a pure function of (state, batch): each call copies the state's and batch's tensors into the
graph's static inputs, replays, and returns *copies* of the graph's outputs, so a caller may keep any earlier
state (the next replay overwrites only the graph's own buffers). Inputs and outputs each sit in one flat buffer
per dtype, so that copy is a cat and a copy in and one clone out per dtype, not one launch per tensor (the
small byte path's state has 236 tensors); the returned tensors are views into their call's buffers. One graph is
captured per input structure (the pytree layout and every tensor's shape, dtype and device); the first call
of a structure runs three warm-up steps first (compiles, cuBLAS workspaces, Triton autotuning happen there,
outside the capture).
Each graph keeps the memory of one step (its private pool, plus its flat input and output buffers) for as
long as the GraphedTrainStep lives: about the peak of an uncaptured step (benchmarks/RESULTS.md).

What a graph cannot do: run host work per step. So the step must be free of host syncs (the compiled
objective with fixed-step halting loops is), the batch's id range is not checked per call (as in the compiled
step, whose traced graph skips that check), and the MoE must take its dense dispatch (B*T <= moe.dense_limit),
whose shapes do not depend on the data. CUDA only.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.utils._pytree as pytree
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from arbfn.config import Config
from arbfn.model import State
from arbfn.objective import as_batch

Step = Callable[[State, Any], tuple[State, dict[str, torch.Tensor]]]
WARMUP_STEPS = 3
T = TypeVar("T")


def capture(fn: Callable[[], T], warmup: int = WARMUP_STEPS) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, what ``fn`` returned while captured): ``fn`` run ``warmup`` times on a side stream (compiles,
    workspaces and autotuning happen there), then recorded once. Replaying the graph reruns ``fn``'s kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def _structure(leaves: list[Any], spec: pytree.TreeSpec) -> tuple:
    """A hashable key of a flattened tree's layout: its spec and each tensor leaf's shape, dtype and device."""
    return spec, tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves)


class FlatTensors:
    """A layout of tensors in one flat buffer per dtype: a whole state moves in and out of a graph in a few
    copies instead of one launch per tensor, and the tensors come back as views made in C++
    (``torch._utils._unflatten_dense_tensors``, as DDP's buckets do), not one Python view per tensor."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.specs = [(t.shape, t.dtype) for t in tensors]
        self.groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            self.groups.setdefault(t.dtype, []).append(i)
        self.templates = [[torch.empty(tensors[i].shape, dtype=d, device="meta") for i in idx]
                          for d, idx in self.groups.items()]

    def check(self, tensors: list[torch.Tensor]) -> None:
        """Raise ValueError unless ``tensors`` have the layout's shapes and dtypes, in its order."""
        if [(t.shape, t.dtype) for t in tensors] != self.specs:
            raise ValueError("FlatTensors: the tensors' shapes or dtypes differ from the layout's")

    def gather(self, tensors: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One flat buffer per dtype holding ``tensors`` (laid out as at construction), copied into ``out`` (buffers
        an earlier call returned) if given."""
        self.check(tensors)
        flats = [_flatten_dense_tensors([tensors[i] for i in idx]) for idx in self.groups.values()]
        if out is None:
            return flats
        for buffer, flat in zip(out, flats):
            buffer.copy_(flat)
        return out

    def views(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors of the layout as views into ``flats`` (buffers :meth:`gather` returned), in their order."""
        out: list[torch.Tensor] = [flats[0]] * len(self.specs)
        for idx, flat, templates in zip(self.groups.values(), flats, self.templates):
            for i, view in zip(idx, _unflatten_dense_tensors(flat, templates)):
                out[i] = view
        return out


def _with_tensors(leaves: list[Any], tensors: list[torch.Tensor]) -> list[Any]:
    """``leaves`` with its tensor leaves replaced, in order, by ``tensors``."""
    it = iter(tensors)
    return [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]


class _Captured:
    """One captured step: its inputs and outputs each live in one flat buffer per dtype (:class:`FlatTensors`)."""

    def __init__(self, step: Step, state: State, batch: Any) -> None:
        leaves, spec = pytree.tree_flatten((state, batch))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        self.in_layout = FlatTensors(tensors)
        self.flat_in = self.in_layout.gather(tensors)
        inputs = pytree.tree_unflatten(_with_tensors(leaves, self.in_layout.views(self.flat_in)), spec)

        def step_into_flat() -> tuple[list[Any], pytree.TreeSpec, FlatTensors, list[torch.Tensor]]:
            out_leaves, out_spec = pytree.tree_flatten(step(*inputs))
            outputs = [x for x in out_leaves if isinstance(x, torch.Tensor)]
            layout = FlatTensors(outputs)
            return out_leaves, out_spec, layout, layout.gather(outputs)

        self.graph, (self.out_leaves, self.out_spec, self.out_layout, self.flat_out) = capture(step_into_flat)

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[State, dict[str, torch.Tensor]]:
        """Replay on the tensor leaves of (state, batch), in pytree order."""
        self.in_layout.gather(tensors, out=self.flat_in)
        self.graph.replay()
        fresh = self.out_layout.views([flat.clone() for flat in self.flat_out])  # the next replay overwrites flat_out
        return pytree.tree_unflatten(_with_tensors(self.out_leaves, fresh), self.out_spec)


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
        leaves, spec = pytree.tree_flatten((state, batch))  # once per call: the key and the inputs both need it
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        devices = {t.device for t in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedTrainStep needs the state and the batch on one CUDA device, got "
                             f"{', '.join(sorted(map(str, devices))) or 'no tensors'}")
        key = _structure(leaves, spec)
        if key not in self._graphs:
            with torch.cuda.device(next(iter(devices))):
                self._graphs[key] = _Captured(self._step, state, batch)
        return self._graphs[key](tensors)
