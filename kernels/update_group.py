"""The sign-vote update of a list of weights as one op: ``arbfn::ternary_update_group``.

A train step updates every ternary weight (69 on the small byte path). One single-weight op (kernels/update.py)
per weight costs each weight its own launches: a copy of its packed bytes, a fill of its count buffer, the
kernel, two count sums; a compiled or CUDA-graph step runs them all. This op takes the lists and returns each
output as one flat buffer, so on CUDA the step issues one multi-tensor copy of the packed bytes, one fill, one
fused kernel per weight (spread over side streams, so that small weights' kernels overlap) and two sums.
Weight by weight the rule is the single-weight ops', so the results equal theirs bit for bit.

    ternary_update_group(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold,
                         exp_threshold, counter_bits, seeds) -> (packed', exp', t_accum', e_accum', flips, exp_moves)

Every list holds one entry per weight, as the single-weight ops take them. Counter flips: ``step`` and
``cutoff`` None, one ``t_accum`` per weight of ``counter_bits`` (8, or 4 packed), ``seeds`` empty. Stochastic
flips: ``step`` and ``cutoff`` the 0-dim int64 tensors of ``ternary_update_stochastic``, ``t_accum`` empty, one
seed per weight (:func:`kernels.update.stream_seed`), ``flip_threshold`` unused; t_accum' is then an empty int8
tensor. packed', exp', t_accum' and e_accum' are 1-D buffers holding each weight's new tensor at an offset of
:func:`flat_offsets`; :func:`unflatten` returns them as per-weight views. flips and exp_moves are 0-dim int64
totals over the list.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable, Sequence

import torch

from kernels._triton import cdiv, check_launchable
from kernels.update import (Outputs, check_stochastic_args, check_update_args, fused_tiles, fuses,
                            launch_fused_into, launch_update, ternary_update_reference,
                            ternary_update_stochastic_reference)

FLAT_ALIGN = 16  # bytes: Triton specialises pointers on 16-byte alignment, the fused kernel adds to aligned words
GroupOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def flat_offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """(offset of each 1-byte-element tensor in its flat buffer, the buffer's length): offsets are multiples of
    FLAT_ALIGN and the buffer has FLAT_ALIGN bytes of room after the last tensor (the fused kernel's last word)."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += cdiv(t.numel(), FLAT_ALIGN) * FLAT_ALIGN
    return offsets, end + FLAT_ALIGN


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views into ``flat`` (an output of the op) shaped like ``like`` (the op's matching input list)."""
    offsets, _ = flat_offsets(like)
    return [flat[o:o + t.numel()].view(t.shape) for o, t in zip(offsets, like)]


LANES = 8  # CUDA streams a group's fused kernels spread over
_lanes: dict[int, list[torch.cuda.Stream]] = {}


def run_in_lanes(device: torch.device, launches: list[Callable[[], None]]) -> None:
    """Run ``launches`` (independent kernel launches) round-robin on LANES side streams forked from the current
    stream and joined back to it, so they overlap on the GPU (most weights are too small to fill it alone; in a
    CUDA graph the lanes become parallel branches). On CPU, or for one launch, in order on the current stream."""
    if device.type != "cuda" or len(launches) < 2:
        for run in launches:
            run()
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    lanes = _lanes.setdefault(index, [torch.cuda.Stream(index) for _ in range(LANES)])[:len(launches)]
    main = torch.cuda.current_stream(index)
    for lane in lanes:
        lane.wait_stream(main)
    for j, run in enumerate(launches):
        with torch.cuda.stream(lanes[j % len(lanes)]):
            run()
    for lane in lanes:
        main.wait_stream(lane)


def check_group_args(packed: list[torch.Tensor], exp: list[torch.Tensor], t_accum: list[torch.Tensor],
                     e_accum: list[torch.Tensor], grad: list[torch.Tensor], step: torch.Tensor | None,
                     cutoff: torch.Tensor | None, ks: list[int], group_sizes: list[int], flip_threshold: int,
                     exp_threshold: int, counter_bits: int, seeds: list[int]) -> None:
    """Raise ValueError unless the lists describe the same weights and each weight's arguments pass its
    single-weight op's checks (metadata only)."""
    n = len(packed)
    if n == 0:
        raise ValueError("ternary_update_group needs at least one weight, got empty lists")
    stochastic = step is not None
    if (cutoff is None) == stochastic:
        raise ValueError("ternary_update_group: step and cutoff go together (stochastic flips) or are both None "
                         "(counter flips)")
    lists = {"exp": exp, "e_accum": e_accum, "grad": grad, "ks": ks, "group_sizes": group_sizes,
             **({"seeds": seeds} if stochastic else {"t_accum": t_accum})}
    if stochastic and t_accum:
        raise ValueError(f"ternary_update_group: stochastic flips keep no counters, got {len(t_accum)} t_accum")
    if not stochastic and seeds:
        raise ValueError(f"ternary_update_group: counter flips take no seeds, got {len(seeds)}")
    for name, items in lists.items():
        if len(items) != n:
            raise ValueError(f"ternary_update_group needs one {name} per weight: {n} packed, {len(items)} {name}")
    if len({t.device for t in [*packed, *exp, *t_accum, *e_accum, *grad]}) != 1:
        raise ValueError("ternary_update_group: every tensor must be on one device")
    for i in range(n):
        try:
            if stochastic:
                check_stochastic_args(packed[i], exp[i], e_accum[i], grad[i], step, cutoff, ks[i], group_sizes[i],
                                      exp_threshold, seeds[i])
            else:
                check_update_args(packed[i], exp[i], t_accum[i], e_accum[i], grad[i], ks[i], group_sizes[i],
                                  flip_threshold, exp_threshold, counter_bits)
        except ValueError as e:
            raise ValueError(f"ternary_update_group, weight {i}: {e}") from None


def _flat_outputs(packed: list[torch.Tensor], exp: list[torch.Tensor], t_accum: list[torch.Tensor],
                  e_accum: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed flat buffers for packed', exp', t_accum' (empty int8 without counters) and e_accum': the gaps
    between weights stay zero, so the outputs are a function of the inputs, bytes between weights included."""
    return [packed[0].new_zeros(flat_offsets(ts)[1] if ts else 0, dtype=ts[0].dtype if ts else torch.int8)
            for ts in (packed, exp, t_accum, e_accum)]


def _flat_views(flats: list[torch.Tensor], inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor | None]]:
    """Per-weight views into the four flat outputs, shaped like their inputs (Nones for absent counters)."""
    return [unflatten(flat, ts) if ts else [None] * len(inputs[0]) for flat, ts in zip(flats, inputs)]


def _weight_by_weight(views: list[list[torch.Tensor | None]], indices: Sequence[int],
                      update_one: Callable[[int], Outputs], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``update_one(i)`` (a single-weight update's six outputs) for each index and copy its new tensors into
    their ``views``; returns the flips and exponent moves it counted."""
    flips = torch.zeros((), dtype=torch.int64, device=device)
    moves = flips.clone()
    for i in indices:
        *new, f, m = update_one(i)
        for view, t in zip(views, new):
            if t is not None:
                view[i].copy_(t)
        flips, moves = flips + f, moves + m
    return flips, moves


def _one_reference(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold,
                   exp_threshold, counter_bits, seeds) -> Callable[[int], Outputs]:
    """Weight i's update by the single-weight references."""
    def update_one(i: int) -> Outputs:
        if step is None:
            return ternary_update_reference(packed[i], exp[i], t_accum[i], e_accum[i], grad[i], ks[i], group_sizes[i],
                                            flip_threshold, exp_threshold, counter_bits)
        p, e, a, f, m = ternary_update_stochastic_reference(packed[i], exp[i], e_accum[i], grad[i], step, cutoff,
                                                            ks[i], group_sizes[i], exp_threshold, seeds[i])
        return p, e, None, a, f, m

    return update_one


@torch.library.custom_op("arbfn::ternary_update_group", mutates_args=())
def ternary_update_group(packed: list[torch.Tensor], exp: list[torch.Tensor], t_accum: list[torch.Tensor],
                         e_accum: list[torch.Tensor], grad: list[torch.Tensor], step: torch.Tensor | None,
                         cutoff: torch.Tensor | None, ks: list[int], group_sizes: list[int], flip_threshold: int,
                         exp_threshold: int, counter_bits: int, seeds: list[int]) -> GroupOutputs:
    """Every listed weight's sign-vote step: (packed', exp', t_accum', e_accum' as flat buffers, flips, moves)."""
    args = (packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold, exp_threshold,
            counter_bits, seeds)
    check_group_args(*args)
    flats = _flat_outputs(packed, exp, t_accum, e_accum)
    flips, moves = _weight_by_weight(_flat_views(flats, [packed, exp, t_accum, e_accum]), range(len(packed)),
                                     _one_reference(*args), packed[0].device)
    return (*flats, flips, moves)


def ternary_update_group_triton(packed: list[torch.Tensor], exp: list[torch.Tensor], t_accum: list[torch.Tensor],
                                e_accum: list[torch.Tensor], grad: list[torch.Tensor], step: torch.Tensor | None,
                                cutoff: torch.Tensor | None, ks: list[int], group_sizes: list[int],
                                flip_threshold: int, exp_threshold: int, counter_bits: int,
                                seeds: list[int]) -> GroupOutputs:
    """The group on the kernels (CUDA, or CPU under the interpreter): the packed bytes copied into their flat
    buffer at once, then the fused kernel per weight into its slices (spread over :func:`run_in_lanes`' side
    streams, biggest weights first), the counts summed once; weights of group sizes the fused kernel does not
    take run the two-kernel update and are copied into place."""
    check_group_args(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold,
                     exp_threshold, counter_bits, seeds)
    contiguous = [[x.contiguous() for x in ts] for ts in (packed, exp, t_accum, e_accum, grad)]
    packed, exp, t_accum, e_accum, grad = contiguous
    check_launchable(*packed, *grad)
    flats = _flat_outputs(packed, exp, t_accum, e_accum)
    views = _flat_views(flats, [packed, exp, t_accum, e_accum])
    torch._foreach_copy_(views[0], packed)  # the fused kernel adds each flip's delta to the old bytes

    def weight_args(i: int) -> tuple:
        """Weight i's leading arguments of the single-weight launchers."""
        return (packed[i], exp[i], t_accum[i] if t_accum else None, e_accum[i], grad[i],
                None if step is None else (step, cutoff, seeds[i]), ks[i], group_sizes[i], flip_threshold,
                exp_threshold, counter_bits)

    live = [i for i, p in enumerate(packed) if p.shape[0] > 0]
    fused = [i for i in live if fuses(group_sizes[i])]
    tiles = [fused_tiles(packed[i].shape[0], ks[i]) for i in fused]
    counts = torch.zeros((2, sum(tiles)), dtype=torch.int32, device=packed[0].device)
    starts = [0, *accumulate(tiles)]

    def launch(j: int) -> Callable[[], None]:
        i = fused[j]
        new_packed, new_exp, new_t_accum, new_e_accum = (v[i] for v in views)
        return lambda: launch_fused_into(*weight_args(i), new_packed, new_t_accum, new_exp, new_e_accum,
                                         counts[:, starts[j]:starts[j + 1]])

    biggest_first = sorted(range(len(fused)), key=lambda j: -packed[fused[j]].numel())
    run_in_lanes(packed[0].device, [launch(j) for j in biggest_first])
    flips, moves = counts[0].sum(dtype=torch.int64), counts[1].sum(dtype=torch.int64)
    rest = [i for i in live if not fuses(group_sizes[i])]
    if rest:
        more_flips, more_moves = _weight_by_weight(views, rest, lambda i: launch_update(*weight_args(i)),
                                                   packed[0].device)
        flips, moves = flips + more_flips, moves + more_moves
    return (*flats, flips, moves)


@ternary_update_group.register_kernel("cuda")
def _(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold, exp_threshold,
      counter_bits, seeds):
    return ternary_update_group_triton(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes,
                                       flip_threshold, exp_threshold, counter_bits, seeds)


@ternary_update_group.register_fake
def _(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold, exp_threshold,
      counter_bits, seeds):
    check_group_args(packed, exp, t_accum, e_accum, grad, step, cutoff, ks, group_sizes, flip_threshold,
                     exp_threshold, counter_bits, seeds)
    counts = [packed[0].new_empty((), dtype=torch.int64) for _ in range(2)]
    return (*_flat_outputs(packed, exp, t_accum, e_accum), *counts)
