"""The packed ternary weight as a pytree node, and the tree-wide helpers a train step needs.

A :class:`TernaryWeight` holds only integers: packed trits (uint8, 5 per byte), an int8 log2 scale per
group of ``group_size`` inputs, and the vote accumulators: int8 ``e_accum`` per group, and ``t_accum`` per
weight for counter flips only (stochastic flips keep none: ``UpdateConfig.flip_mode``), int8 [N, K] or, with
4-bit counters (``UpdateConfig.counter_bits``), uint8 nibble pairs [N, ceil(K/2)]; chain flips keep their place
bits there, int16 words [N, ceil(K/16)], and no ``e_accum`` (their exponents stay put). Its dtype tells which:
:func:`flip_counter_bits`. ``probe`` is never
persistent: a train step attaches a zero float tensor there so that autograd delivers ``dL/dW`` (DESIGN.md §4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from kernels import embedding as embedding_ops
from kernels import linear as linear_ops
from kernels import update as update_ops
from kernels import update_chain as chain_ops
from kernels import update_group as update_group_ops
from kernels.packing import (check_group_size, decode_reference, n_groups, pack_reference, packed_width,
                             unpack_reference, validate_packed)


@dataclasses.dataclass(frozen=True)
class TernaryWeight:
    """Packed ternary matrix [out_features, in_features] with group scales and training counters."""

    packed: torch.Tensor
    exp: torch.Tensor
    t_accum: torch.Tensor | None
    e_accum: torch.Tensor | None
    in_features: int
    group_size: int
    probe: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        """Rows of the logical matrix."""
        return self.packed.shape[0]

    @property
    def num_weights(self) -> int:
        """Logical ternary weights (padding excluded)."""
        return self.out_features * self.in_features

    @property
    def trainable(self) -> bool:
        """Whether an accumulator is present: the exponents', or the chain's place bits (inference-only and fixed
        weights keep neither)."""
        return self.e_accum is not None or self.t_accum is not None


CHAIN_BITS = 1  # flip_counter_bits of a chain's place bits
_COUNTER_BITS = {torch.int8: 8, torch.uint8: 4, chain_ops.PLACE_DTYPE: CHAIN_BITS}  # t_accum dtype -> bits/weight


def flip_counter_bits(w: TernaryWeight) -> int | None:
    """The bits per weight of ``w``'s ``t_accum``: 8 (int8 counters), 4 (packed nibbles), 1 (a chain's place bits),
    None without one or of another dtype."""
    return None if w.t_accum is None else _COUNTER_BITS.get(w.t_accum.dtype)


def accumulator_layout(k: int, bits: int) -> tuple[torch.dtype, int]:
    """(dtype, elements per row) of the ``t_accum`` of a k-column weight with ``bits`` per weight (8, 4 or 1)."""
    if bits == CHAIN_BITS:
        return chain_ops.PLACE_DTYPE, chain_ops.places_width(k)
    return update_ops.counter_layout(k, bits)


def _flatten(w: TernaryWeight):
    return [w.packed, w.exp, w.t_accum, w.e_accum, w.probe], (w.in_features, w.group_size)


def _unflatten(children, context) -> TernaryWeight:
    packed, exp, t_accum, e_accum, probe = children
    return TernaryWeight(packed, exp, t_accum, e_accum, *context, probe=probe)


def _flatten_with_keys(w: TernaryWeight):
    children, context = _flatten(w)
    keys = ("packed", "exp", "t_accum", "e_accum", "probe")
    return [(pytree.GetAttrKey(k), c) for k, c in zip(keys, children)], context


pytree.register_pytree_node(TernaryWeight, _flatten, _unflatten, serialized_type_name="arbfn.TernaryWeight",
                            flatten_with_keys_fn=_flatten_with_keys)


def is_ternary(x: Any) -> bool:
    """Pytree ``is_leaf`` predicate that stops at ternary weights."""
    return isinstance(x, TernaryWeight)


def init_exponent(fan_in: int, zero_fraction: float = 1 / 3, gain: float = 1.0) -> int:
    """Log2 scale that gives outputs of about ``gain`` std for unit-variance inputs (fan-in scaling)."""
    return round(math.log2(gain / math.sqrt(max(1.0, (1 - zero_fraction) * fan_in))))


def init_ternary(out_features: int, in_features: int, group_size: int, generator: torch.Generator | None,
                 *, exponent: int | None = None, zero_fraction: float = 1 / 3, trits: int | None = None,
                 device: torch.device | str | None = None) -> TernaryWeight:
    """A fresh weight: random trits (about ``zero_fraction`` zeros) or all ``trits``, fan-in scaled exponent.

    ``generator=None`` builds it shape-only on the meta device (for counting large presets).
    """
    check_group_size(group_size)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"a ternary weight needs positive sizes, got [{out_features}, {in_features}]")
    e = init_exponent(in_features, zero_fraction) if exponent is None else exponent
    groups = n_groups(in_features, group_size)
    if generator is None:
        meta = torch.device("meta")
        packed = torch.empty((out_features, packed_width(in_features)), dtype=torch.uint8, device=meta)
        t = None
    else:
        if trits is not None:
            t = torch.full((out_features, in_features), trits, dtype=torch.int8)
        else:
            u = torch.rand((out_features, in_features), generator=generator)
            sign = torch.where(torch.rand((out_features, in_features), generator=generator) < 0.5, -1, 1)
            t = torch.where(u < zero_fraction, 0, sign).to(torch.int8)
        packed = pack_reference(t).to(device)
    dev = packed.device
    return TernaryWeight(
        packed=packed,
        exp=torch.full((out_features, groups), e, dtype=torch.int8, device=dev),
        t_accum=torch.zeros((out_features, in_features), dtype=torch.int8, device=dev),
        e_accum=torch.zeros((out_features, groups), dtype=torch.int8, device=dev),
        in_features=in_features,
        group_size=group_size,
    )


def validate_weight(w: TernaryWeight, name: str = "weight") -> None:
    """Raise ValueError unless every tensor of ``w`` has the dtype and shape its format requires."""
    try:
        check_group_size(w.group_size)
        validate_packed(w.packed, w.in_features)
        n, g = w.out_features, n_groups(w.in_features, w.group_size)
        bits = flip_counter_bits(w) or 8
        counter_dtype, counter_width = accumulator_layout(w.in_features, bits)
        expected = {"exp": (w.exp, torch.int8, (n, g)), "t_accum": (w.t_accum, counter_dtype, (n, counter_width)),
                    "e_accum": (w.e_accum, torch.int8, (n, g))}
        # stochastic flips: no t_accum; chain flips: no e_accum; frozen: neither
        optional = {"t_accum": True, "e_accum": w.t_accum is None or bits == CHAIN_BITS}
        for field, (t, dtype, shape) in expected.items():
            if t is None and optional.get(field, False):
                continue
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{field} must be {dtype} {shape}, got {got}")
        if flip_counter_bits(w) == 4 and w.in_features % 2 and bool((w.t_accum[:, -1] >> 4).any()):
            raise ValueError("t_accum padding nibbles (high nibble of each row's last byte) must be 0")
        used = w.in_features % chain_ops.PLACE_BITS  # place bits used in each row's last word (0: all)
        last = w.t_accum[:, -1].to(torch.int64) & chain_ops.PLACE_MASK if bits == CHAIN_BITS else None
        if last is not None and used and bool((last >> used).any()):
            raise ValueError("t_accum place bits beyond in_features (high bits of each row's last word) must be 0")
        if w.probe is not None:
            raise ValueError("a persistent weight must not carry a probe")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def decode(w: TernaryWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``T * 2**E`` (+ probe) for small parameters such as norm gains; differentiable through the probe."""
    dense = decode_reference(w.packed, w.exp, w.in_features, w.group_size, dtype)
    return dense if w.probe is None else dense + w.probe


def linear(w: TernaryWeight, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` through the ternary linear op."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"linear expects inputs with {w.in_features} features, got shape {tuple(x.shape)}")
    return linear_ops.ternary_linear(x, w.packed, w.exp, w.probe, w.in_features, w.group_size)


def embed(w: TernaryWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows of W for integer ``ids`` through the ternary embedding op."""
    return embedding_ops.ternary_embedding(ids, w.packed, w.exp, w.probe, w.in_features, w.group_size)


def map_weights(fn: Callable[[TernaryWeight], Any], tree: Any) -> Any:
    """Apply ``fn`` to every ternary weight of ``tree``."""
    return pytree.tree_map(lambda x: fn(x) if is_ternary(x) else x, tree, is_leaf=is_ternary)


def weights(tree: Any) -> list[TernaryWeight]:
    """The ternary weights of ``tree`` in pytree order."""
    return [x for x in pytree.tree_leaves(tree, is_leaf=is_ternary) if is_ternary(x)]


def weights_with_grads(tree: Any, grads: Any) -> tuple[list[TernaryWeight], list[Any],
                                                        Callable[[list[TernaryWeight]], Any]]:
    """The ternary weights of ``tree`` in pytree order (weight number j of a run), the matching leaves of ``grads``
    (a tree mirroring ``tree``: None for an untrainable weight), and a function that puts new weights, in that
    order, back into a copy of ``tree``."""
    leaves, spec = pytree.tree_flatten(tree, is_leaf=is_ternary)
    grad_leaves = spec.flatten_up_to(grads)
    at = [i for i, w in enumerate(leaves) if is_ternary(w)]

    def rebuild(new: list[TernaryWeight]) -> Any:
        out = list(leaves)
        for i, w in zip(at, new):
            out[i] = w
        return pytree.tree_unflatten(out, spec)

    return [leaves[i] for i in at], [grad_leaves[i] for i in at], rebuild


def make_probes(tree: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A tree of zero probes (0-stride, so they cost no memory) mirroring the trainable weights of ``tree``. They
    expand one zero per device, so making them launches one fill per device, not one per weight."""
    zeros: dict[torch.device, torch.Tensor] = {}

    def probe(w: TernaryWeight):
        if not w.trainable:
            return None
        device = w.packed.device
        if device not in zeros:
            zeros[device] = torch.zeros((), dtype=dtype, device=device)
        return zeros[device].expand(w.out_features, w.in_features)

    return pytree.tree_map(lambda x: probe(x) if is_ternary(x) else None, tree, is_leaf=is_ternary)


def attach_probes(tree: Any, probes: Any) -> Any:
    """``tree`` with each weight's probe set from the matching leaf of ``probes``."""
    return pytree.tree_map(lambda w, p: dataclasses.replace(w, probe=p) if is_ternary(w) else w,
                           tree, probes, is_leaf=is_ternary)


def update_weights(ws: list[TernaryWeight], grads: list[torch.Tensor | None], flip_threshold: int,
                   exp_threshold: int, step: torch.Tensor | None = None, seed: int = 0, counter_bits: int = 8,
                   cutoff: torch.Tensor | None = None, first_index: int = 0
                   ) -> tuple[list[TernaryWeight], torch.Tensor, torch.Tensor]:
    """One sign-vote update of every weight of ``ws`` from its ``dL/dW`` in ``grads`` (None, or an untrainable
    weight: kept as is), as one ``arbfn::ternary_update_group`` (kernels/update_group.py): returns (new weights,
    trits flipped, exponents moved), the new tensors views into the op's flat buffers.

    Without ``step``: counter flips (each weight needs ``t_accum`` of ``counter_bits``: 8, or 4 packed). With
    ``step`` (the state's int64 step counter): stochastic flips, ``ws[i]`` drawing from the stream of (run ``seed``,
    weight number ``first_index + i``), each vote moving its trit where its draw falls below ``cutoff``
    (``update_ops.flip_cutoff`` of the step: a θ schedule; default the constant ``flip_threshold``); the new
    weights have no t_accum (a counter a weight had is dropped: this rule never reads it).
    """
    if len(grads) != len(ws):
        raise ValueError(f"update_weights needs one gradient (or None) per weight: {len(ws)} weights, "
                         f"{len(grads)} gradients")
    live = [i for i, (w, g) in enumerate(zip(ws, grads)) if g is not None and w.trainable]
    device = ws[0].packed.device if ws else (step.device if step is not None else None)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if not live:
        return list(ws), zero, zero.clone()
    stochastic = step is not None
    if stochastic and cutoff is None:
        cutoff = update_ops.flip_cutoff(step, flip_threshold)
    for i in live if not stochastic else ():
        if ws[i].t_accum is None:
            raise ValueError("counter flips need t_accum; this weight has none (laid out for stochastic flips: "
                             "set_flip_counters(tree, True) adds zero counters)")
        if flip_counter_bits(ws[i]) != counter_bits:
            raise ValueError(f"this weight's flip counters are {flip_counter_bits(ws[i])}-bit ({ws[i].t_accum.dtype}), "
                             f"the update asks for {counter_bits}-bit: a state's counter width belongs to its run")
    sel = [ws[i] for i in live]
    packed, exp, e_accum = [w.packed for w in sel], [w.exp for w in sel], [w.e_accum for w in sel]
    t_accum = [] if stochastic else [w.t_accum for w in sel]
    seeds = [update_ops.stream_seed(seed, first_index + i) for i in live] if stochastic else []
    flat_packed, flat_exp, flat_t, flat_e, flips, moves = update_group_ops.ternary_update_group(
        packed, exp, t_accum, e_accum, [grads[i] for i in live], step, cutoff, [w.in_features for w in sel],
        [w.group_size for w in sel], 0 if stochastic else flip_threshold, exp_threshold, counter_bits, seeds)
    new_t = update_group_ops.unflatten(flat_t, t_accum) if t_accum else [None] * len(sel)
    out = list(ws)
    for i, w, p, e, t, a in zip(live, sel, update_group_ops.unflatten(flat_packed, packed),
                                update_group_ops.unflatten(flat_exp, exp), new_t,
                                update_group_ops.unflatten(flat_e, e_accum)):
        out[i] = TernaryWeight(p, e, t, a, w.in_features, w.group_size)
    return out, flips, moves


def update_weight(w: TernaryWeight, grad: torch.Tensor | None, flip_threshold: int, exp_threshold: int,
                  step: torch.Tensor | None = None, seed: int = 0, index: int = 0, counter_bits: int = 8,
                  cutoff: torch.Tensor | None = None) -> tuple[TernaryWeight, torch.Tensor, torch.Tensor]:
    """:func:`update_weights` of the one weight ``w``, drawing (stochastic flips) from the stream of weight number
    ``index`` of a run: returns (new weight, trits flipped, exponents moved)."""
    new, flips, moves = update_weights([w], [grad], flip_threshold, exp_threshold, step, seed, counter_bits, cutoff,
                                       first_index=index)
    return new[0], flips, moves


def dither_flip_counters(tree: Any, flip_threshold: int, generator: torch.Generator) -> Any:
    """``tree`` with every flip counter drawn uniform in [-(θ-1), θ-1] (θ = ``flip_threshold``), in pytree
    order from ``generator``: a fresh state's first flips then spread over steps instead of landing together.
    4-bit counters get the same draws as 8-bit ones would (then packed), so θ must fit them (<= 7)."""

    def dither(w: TernaryWeight) -> TernaryWeight:
        bits = flip_counter_bits(w)
        if bits is None:
            return w
        if not 1 <= flip_threshold <= update_ops.COUNTER_LIMITS[bits]:
            raise ValueError(f"flip_threshold must be in 1..{update_ops.COUNTER_LIMITS[bits]} for {bits}-bit "
                             f"counters, got {flip_threshold}")
        start = torch.randint(1 - flip_threshold, flip_threshold, (w.out_features, w.in_features),
                              generator=generator, dtype=torch.int8)
        start = update_ops.pack_nibbles(start) if bits == 4 else start
        return dataclasses.replace(w, t_accum=start.to(w.t_accum.device))

    return map_weights(dither, tree)


def set_flip_counters(tree: Any, present: bool, counter_bits: int = 8) -> Any:
    """``tree`` (params, a State, any pytree) with every trainable weight's ``t_accum`` present (kept, or zeros of
    ``counter_bits``: no votes yet) or dropped: the layout of a flip mode (``UpdateConfig.flip_counters``).
    Counters of another width raise ValueError (they cannot be kept, and resetting them would lose votes), as do a
    chain's place bits (:func:`set_chain_places` lays a state out for chain flips)."""
    update_ops.check_counter_bits(counter_bits)

    def layout(w: TernaryWeight) -> TernaryWeight:
        if flip_counter_bits(w) == CHAIN_BITS:
            raise ValueError("this weight keeps a chain's place bits and no exponent accumulator: a chain state's "
                             "layout belongs to its run (UpdateConfig.flip_mode 'chain')")
        if not w.trainable or (w.t_accum is None and not present):
            return w
        if w.t_accum is None:
            dtype, width = update_ops.counter_layout(w.in_features, counter_bits)
            return dataclasses.replace(w, t_accum=torch.zeros((w.out_features, width), dtype=dtype,
                                                              device=w.packed.device))
        if not present:
            return dataclasses.replace(w, t_accum=None)
        if flip_counter_bits(w) != counter_bits:
            raise ValueError(f"flip counters are {flip_counter_bits(w)}-bit ({w.t_accum.dtype}), the layout asks for "
                             f"{counter_bits}-bit: a state's counter width belongs to its run "
                             "(UpdateConfig.counter_bits)")
        return w

    return map_weights(layout, tree)


def start_places(w: TernaryWeight, generator: torch.Generator | None) -> torch.Tensor:
    """Fresh chain place bits for ``w`` (int16 words, on its device): each nonzero trit at the outer place of its
    level (bit 1 for +1, 0 for -1), each zero trit's bit drawn from ``generator`` (0 without one; zeros throughout
    on the meta device)."""
    dtype, width = accumulator_layout(w.in_features, CHAIN_BITS)
    if w.packed.device.type == "meta":
        return torch.zeros((w.out_features, width), dtype=dtype, device=w.packed.device)
    t = unpack_reference(w.packed.cpu(), w.in_features)
    free = (torch.randint(0, 2, t.shape, generator=generator) if generator is not None
            else torch.zeros(t.shape, dtype=torch.int64))
    bits = torch.where(t > 0, 1, torch.where(t < 0, 0, free))
    return chain_ops.pack_places(bits).to(w.packed.device)


def set_chain_places(tree: Any, generator: torch.Generator | None = None) -> Any:
    """``tree`` laid out for chain flips: every trainable weight keeps its place bits (or gets
    :func:`start_places`, drawn in pytree order from ``generator``) and no exponent accumulator (its exponents
    stay put; flip counters it had are dropped)."""

    def layout(w: TernaryWeight) -> TernaryWeight:
        if not w.trainable:
            return w
        places = w.t_accum if flip_counter_bits(w) == CHAIN_BITS else start_places(w, generator)
        return dataclasses.replace(w, t_accum=places, e_accum=None)

    return map_weights(layout, tree)


def fix_weights(tree: Any, fixed: Callable[[tuple], bool]) -> Any:
    """``tree`` with every weight whose pytree path ``fixed(path)`` accepts holding neither accumulator: no update
    moves it again."""
    return pytree.tree_map_with_path(
        lambda path, w: dataclasses.replace(w, t_accum=None, e_accum=None) if is_ternary(w) and fixed(path) else w,
        tree, is_leaf=is_ternary)


def update_chain_weights(ws: list[TernaryWeight], grads: list[torch.Tensor | None], step: torch.Tensor,
                         cutoff: torch.Tensor, scale: float, power: float, seed: int = 0, first_index: int = 0
                         ) -> tuple[list[TernaryWeight], torch.Tensor]:
    """One chain step (``arbfn::ternary_update_chain``, kernels/update_chain.py) of every weight of ``ws`` with a
    gradient and place bits, weight i drawing from the stream of (run ``seed``, weight number ``first_index + i``),
    its move probabilities times ``cutoff`` (:func:`kernels.update.flip_cutoff` of the step); the others are kept
    as they are. Returns (new weights, trits flipped)."""
    if len(grads) != len(ws):
        raise ValueError(f"update_chain_weights needs one gradient (or None) per weight: {len(ws)} weights, "
                         f"{len(grads)} gradients")
    flips = torch.zeros((), dtype=torch.int64, device=step.device)
    out = list(ws)
    for i, (w, g) in enumerate(zip(ws, grads)):
        if g is None or not w.trainable:
            continue
        if flip_counter_bits(w) != CHAIN_BITS:
            raise ValueError(f"chain flips need place bits (int16 t_accum); weight {first_index + i} has "
                             f"{'none' if w.t_accum is None else w.t_accum.dtype} (set_chain_places lays a state out)")
        packed, places, n = chain_ops.ternary_update_chain(w.packed, w.t_accum, g, step, cutoff, w.in_features,
                                                           w.group_size, scale, power,
                                                           update_ops.stream_seed(seed, first_index + i))
        out[i] = TernaryWeight(packed, w.exp, places, None, w.in_features, w.group_size)
        flips = flips + n
    return out, flips


def to_device(tree: Any, device: torch.device | str) -> Any:
    """``tree`` with every tensor moved to ``device`` (None leaves stay None)."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)
