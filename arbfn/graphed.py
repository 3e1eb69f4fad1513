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
small byte path's state has 236 tensors); the returned tensors are views into their call's buffers, made in C++.
A train loop passes each call the state the call before returned. So the graph ends by copying its new state
into its own state input as well (a few copies on the device), and a call whose state is exactly the one the
last call returned (the same tensors, not written in place since: their version counters say so) copies only
its batch in. When it is the very State object, unchanged (State and TernaryWeight are frozen, so its dicts and
lists are checked item by item), the call does not even flatten it: that flatten was the largest host cost in
front of each replay. On the H200 the host spent 1.4 ms per call on the copy in (benchmarks/RESULTS.md). One graph is
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

import operator
from typing import Any, Callable, TypeVar

import torch
import torch.utils._pytree as pytree
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from arbfn.config import Config
from arbfn.model import State
from arbfn.objective import as_batch
from arbfn.ternary import TernaryWeight

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


ALIGN_BYTES = 16


class FlatTensors:
    """A layout of tensors in one flat buffer per dtype: a whole state moves in and out of a graph in a few
    copies instead of one launch per tensor, and the tensors come back as views made in C++
    (``torch._utils._unflatten_dense_tensors``, as DDP's buckets do), not one Python view per tensor.

    Each tensor starts at a multiple of ``ALIGN_BYTES`` within its buffer (zero padding between tensors): the
    compiled step copies every input that is not 16-byte aligned before using it (Inductor's misaligned-input
    check), which cost the captured small step 137 device copies per replay, and Triton specialises aligned
    pointers for vector loads."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.specs = [(t.shape, t.dtype) for t in tensors]
        self.groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            self.groups.setdefault(t.dtype, []).append(i)
        self.pads = {d: self._pads(d, [tensors[i].numel() for i in idx]) for d, idx in self.groups.items()}
        self.templates = [self._interleave([torch.empty(tensors[i].shape, dtype=d, device="meta") for i in idx],
                                           [torch.empty(n, dtype=d, device="meta") for n in self.pads[d]])
                          for d, idx in self.groups.items()]
        self.positions = [self._positions(self.pads[d]) for d in self.groups]  # the tensors' places among the views
        self.fills: list[list[torch.Tensor]] | None = None  # the zero pads, made on the tensors' device

    @staticmethod
    def _pads(dtype: torch.dtype, sizes: list[int]) -> list[int]:
        """Zero elements after each tensor but the last, so that every tensor starts ``ALIGN_BYTES``-aligned."""
        step = max(1, ALIGN_BYTES // dtype.itemsize)
        return [-n % step for n in sizes[:-1]]

    @staticmethod
    def _positions(pads: list[int]) -> list[int]:
        """Where each tensor sits in its :meth:`_interleave`'d list."""
        places = [0]
        for n in pads:
            places.append(places[-1] + (2 if n else 1))
        return places

    @staticmethod
    def _interleave(tensors: list[torch.Tensor], pads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` with each non-empty pad after its tensor."""
        out = [tensors[0]] if tensors else []
        for t, pad in zip(tensors[1:], pads):
            out += [pad, t] if pad.numel() else [t]
        return out

    def check(self, tensors: list[torch.Tensor]) -> None:
        """Raise ValueError unless ``tensors`` have the layout's shapes and dtypes, in its order."""
        if [(t.shape, t.dtype) for t in tensors] != self.specs:
            raise ValueError("FlatTensors: the tensors' shapes or dtypes differ from the layout's")

    def gather(self, tensors: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One flat buffer per dtype holding ``tensors`` (laid out as at construction), copied into ``out`` (buffers
        an earlier call returned) if given."""
        self.check(tensors)
        if self.fills is None:
            device = tensors[0].device if tensors else None
            self.fills = [[torch.zeros(n, dtype=d, device=device) for n in self.pads[d]] for d in self.groups]
        parts = [self._interleave([tensors[i] for i in idx], fills)
                 for idx, fills in zip(self.groups.values(), self.fills)]
        flats = [_flatten_dense_tensors(p) for p in parts]
        if out is None:  # one contiguous tensor flattens to a view of itself: copy it, as cat copies the others
            return [flat.clone() if len(p) == 1 else flat for flat, p in zip(flats, parts)]
        for buffer, flat in zip(out, flats):
            buffer.copy_(flat)
        return out

    def views(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors of the layout as views into ``flats`` (buffers :meth:`gather` returned), in their order."""
        out: list[torch.Tensor] = [flats[0]] * len(self.specs)
        for idx, flat, templates, places in zip(self.groups.values(), flats, self.templates, self.positions):
            views = _unflatten_dense_tensors(flat, templates)
            for i, j in zip(idx, places):
                out[i] = views[j]
        return out


def _tensors(leaves: list[Any]) -> list[torch.Tensor]:
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class _FlatTree:
    """A pytree's layout (its leaves, spec and :class:`FlatTensors` of its tensor leaves), to rebuild it as views."""

    def __init__(self, tree: Any) -> None:
        self.leaves, self.spec = pytree.tree_flatten(tree)
        self.layout = FlatTensors(_tensors(self.leaves))

    def tree(self, flats: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """(the tree with its tensors as views into ``flats``, buffers of this layout; those views in order)."""
        views = self.layout.views(flats)
        it = iter(views)
        return pytree.tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in self.leaves],
                                     self.spec), views


class _Captured:
    """One captured step. State, batch, new state and metrics each sit in flat buffers per dtype. Where the new
    state has the state's layout (a train step's does), the graph ends by copying it into its own state input
    (``resident``), so the next call on exactly that state has only its batch to copy in."""

    def __init__(self, step: Step, state: State, batch: Any) -> None:
        self.state_in, self.batch_in = _FlatTree(state), _FlatTree(batch)
        self.flat_state = self.state_in.layout.gather(_tensors(self.state_in.leaves))
        self.flat_batch = self.batch_in.layout.gather(_tensors(self.batch_in.leaves))
        self.device = self.flat_state[0].device
        inputs = self.state_in.tree(self.flat_state)[0], self.batch_in.tree(self.flat_batch)[0]

        def step_into_flat() -> tuple[_FlatTree, _FlatTree, list[torch.Tensor], list[torch.Tensor], bool]:
            new_state, metrics = step(*inputs)
            state_out, metrics_out = _FlatTree(new_state), _FlatTree(metrics)
            flat_new = state_out.layout.gather(_tensors(state_out.leaves))
            resident = state_out.spec == self.state_in.spec and state_out.layout.specs == self.state_in.layout.specs
            for into, new in zip(self.flat_state, flat_new) if resident else ():
                into.copy_(new)
            return state_out, metrics_out, flat_new, metrics_out.layout.gather(_tensors(metrics_out.leaves)), resident

        self.graph, (self.state_out, self.metrics_out, self.flat_new, self.flat_metrics, self.resident) = \
            capture(step_into_flat)

    def __call__(self, state: list[torch.Tensor] | None, batch: list[torch.Tensor]
                 ) -> tuple[State, dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Replay on the tensor leaves of the state (None: the graph's state input already holds it) and batch,
        in pytree order: (new state, metrics, the new state's tensors, the flat buffers they view), as views
        into fresh copies (the next replay overwrites the graph's own outputs)."""
        if state is not None:
            self.state_in.layout.gather(state, out=self.flat_state)
        self.batch_in.layout.gather(batch, out=self.flat_batch)
        self.graph.replay()
        flats = [flat.clone() for flat in self.flat_new]
        new_state, tensors = self.state_out.tree(flats)
        return new_state, self.metrics_out.tree([flat.clone() for flat in self.flat_metrics])[0], tensors, flats


def _items(container: dict | list) -> tuple[tuple | None, tuple]:
    """(a dict's keys or None for a list, the values), in order."""
    return (tuple(container), tuple(container.values())) if type(container) is dict else (None, tuple(container))


def _containers(tree: Any) -> list[tuple[Any, tuple | None, tuple]] | None:
    """Every dict and list in ``tree`` with its :func:`_items` now, or None where ``tree`` holds a node of another
    type (only a full flatten can tell whether such a tree changed). Tensors, None and the frozen TernaryWeights
    are leaves here: their tensors' writes show in their version counters."""
    found, todo = [], [tree]
    while todo:
        x = todo.pop()
        if type(x) in (dict, list):
            keys, values = _items(x)
            found.append((x, keys, values))
            todo.extend(values)
        elif type(x) is tuple:  # immutable itself: only what it holds can change
            todo.extend(x)
        elif not (isinstance(x, (torch.Tensor, TernaryWeight)) or x is None):
            return None
    return found


def _unchanged(containers: list[tuple[Any, tuple | None, tuple]]) -> bool:
    """Whether every container :func:`_containers` listed still holds the very same items (keys equal, values
    identical), in the same order. It runs before every replay, so the comparisons stay in C (``map``)."""
    for container, keys, values in containers:
        if len(container) != len(values):
            return False
        if keys is not None:
            if tuple(container) != keys:
                return False
            container = container.values()
        if not all(map(operator.is_, container, values)):
            return False
    return True


class _Returned:
    """The state a resident graph returned last: the State itself, its containers' items, its tensors, and the
    version counters of the flat buffers those tensors view. A view shares its base's counter, so an in-place
    write to any returned tensor (or to another view of the same buffer) bumps its buffer's: a few counters
    to check before each replay instead of one per tensor."""

    def __init__(self, captured: _Captured, state: State, tensors: list[torch.Tensor],
                 flats: list[torch.Tensor]) -> None:
        self.captured = captured
        self.state = state
        self.containers = _containers(state.params)
        self.tensors = tensors
        self.flats = flats
        self.versions = [f._version for f in flats]

    def _unwritten(self) -> bool:
        return all(f._version == v for f, v in zip(self.flats, self.versions))

    def fits_batch(self, batch_spec: pytree.TreeSpec, batch: list[torch.Tensor]) -> bool:
        """Whether a batch with tree ``batch_spec`` and tensor leaves ``batch`` fits the same graph."""
        cap = self.captured
        return (batch_spec == cap.batch_in.spec and [(t.shape, t.dtype) for t in batch] == cap.batch_in.layout.specs
                and all(t.device == cap.device for t in batch))

    def is_this(self, state: State) -> bool:
        """Whether ``state`` is the very State returned, its dicts and lists unchanged and its tensors unwritten:
        no flatten needed (a State and its TernaryWeights are frozen; only dicts and lists can change)."""
        return (state is self.state and self.containers is not None and _unchanged(self.containers)
                and self._unwritten())

    def holds(self, spec: pytree.TreeSpec, state: list[torch.Tensor]) -> bool:
        """Whether a state with tree ``spec`` and tensor leaves ``state`` is this one: the same tree, the very
        tensors, no write since (a new State object around the returned parts, say)."""
        return (len(state) == len(self.tensors) and all(map(operator.is_, state, self.tensors))
                and self._unwritten() and spec == self.captured.state_in.spec)


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
        self._returned: _Returned | None = None

    @property
    def captured(self) -> int:
        """How many input structures have a graph."""
        return len(self._graphs)

    def __call__(self, state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        if self.cfg.model != state.config:
            raise ValueError("GraphedTrainStep: the state's model config differs from the step's")
        batch_leaves, batch_spec = pytree.tree_flatten(batch)
        batch_tensors = _tensors(batch_leaves)
        returned = self._returned
        resume = returned is not None and returned.fits_batch(batch_spec, batch_tensors)
        if resume and returned.is_this(state):  # the common loop: no flatten of the state at all
            return self._remember(returned.captured, None, batch_tensors)
        state_leaves, spec = pytree.tree_flatten(state)
        state_tensors = _tensors(state_leaves)
        if resume and returned.holds(spec, state_tensors):
            return self._remember(returned.captured, None, batch_tensors)
        moe = self.cfg.model.moe
        tokens = as_batch(batch)["bytes"].numel()
        if self.cfg.model.enable_moe and tokens > moe.dense_limit:
            raise ValueError(f"GraphedTrainStep needs the MoE's dense dispatch: the batch has {tokens} ids, above "
                             f"moe.dense_limit {moe.dense_limit} (the sparse dispatch's shapes depend on the data)")
        devices = {t.device for t in state_tensors + batch_tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedTrainStep needs the state and the batch on one CUDA device, got "
                             f"{', '.join(sorted(map(str, devices))) or 'no tensors'}")
        key = _structure(state_leaves, spec), _structure(batch_leaves, batch_spec)
        if key not in self._graphs:
            with torch.cuda.device(next(iter(devices))):
                self._graphs[key] = _Captured(self._step, state, batch)
        return self._remember(self._graphs[key], state_tensors, batch_tensors)

    def _remember(self, captured: _Captured, state: list[torch.Tensor] | None, batch: list[torch.Tensor]
                  ) -> tuple[State, dict[str, torch.Tensor]]:
        """Replay ``captured``; keep what it returned where the next call may start from it."""
        new_state, metrics, tensors, flats = captured(state, batch)
        self._returned = _Returned(captured, new_state, tensors, flats) if captured.resident else None
        return new_state, metrics
