"""The sign-vote update of a list of weights as one op: ``arbfn::ternary_update_group``.

A train step updates every ternary weight (69 on the small byte path). One single-weight op (kernels/update.py)
per weight costs each weight its own launches: a copy of its packed bytes, a fill of its count buffer, the
kernel, two count sums; a compiled or CUDA-graph step runs them all. This op takes the lists and returns each
output as one flat buffer, so on CUDA the step issues a multi-tensor copy per input list (into flat buffers), one
fill, one launch of the fused kernel for all weights of a group size (each program finds its weight in a small
table) and two sums: 69 launches of one small weight each left most of the GPU idle.
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

from typing import Callable, Sequence

import torch

from kernels._triton import cdiv, check_launchable
from kernels.packing import n_groups, packed_width
from kernels.update import (Outputs, _fused_group_kernel, check_stochastic_args, check_update_args, counter_layout,
                            fuses, launch_update, ternary_update_reference, ternary_update_stochastic_reference)

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


GROUP_TILE = (1, 128, 4)  # BLOCK_R, BLOCK_O, num_warps of the one-launch fused kernel: the smallest tile
_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _flat_copy(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(one buffer holding ``tensors`` at :func:`flat_offsets`, the offsets): one multi-tensor copy."""
    offsets, total = flat_offsets(tensors)
    flat = tensors[0].new_empty(total)
    torch._foreach_copy_([flat[o:o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors)], tensors)
    return flat, offsets


def group_table(rows: list[tuple[int, ...]], blocks: list[int], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the int64 [weights, GROUP_COLUMNS] table of a launch, the int32 weight of each of its programs: weight j
    owns ``blocks[j]`` programs), on ``device``. They are kept for the process's life, one pair per distinct
    content (they depend on shapes and seeds only, so a training run makes a few): a CUDA graph captures a kernel
    that reads them, and their first use (a warm-up step, before any capture) is the one host-to-device copy."""
    key = (device, tuple(rows))
    if key not in _tables:
        owners = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), torch.tensor(blocks))
        _tables[key] = torch.tensor(rows, dtype=torch.int64).to(device), owners.to(device)
    return _tables[key]


def launch_fused_group(ids: list[int], packed: list[torch.Tensor], exp: list[torch.Tensor],
                       t_accum: list[torch.Tensor], e_accum: list[torch.Tensor], grad: list[torch.Tensor],
                       step: torch.Tensor | None, cutoff: torch.Tensor | None, ks: list[int], group_size: int,
                       flip_threshold: int, exp_threshold: int, counter_bits: int, seeds: list[int],
                       flats: list[torch.Tensor]) -> torch.Tensor:
    """The fused kernel for weights ``ids`` (non-empty, all of ``group_size``) in one launch, into their slices of
    the op's flat outputs ``flats`` (packed' already holding the old bytes); the inputs are first gathered into
    flat buffers (a multi-tensor copy per list). Returns the int32 [2, programs] flip and move counts."""
    block_r, block_o, warps = GROUP_TILE
    stochastic = step is not None
    pick = lambda ts: [ts[i] for i in ids]
    in_packed, off_p = _flat_copy(pick(packed))
    in_t, off_t = _flat_copy(pick(t_accum)) if not stochastic else (in_packed, [0] * len(ids))
    in_grad, off_g = _flat_copy(pick(grad))
    in_exp, off_e = _flat_copy(pick(exp))
    in_b, off_b = _flat_copy(pick(e_accum))
    out_offsets = [flat_offsets(ts)[0] if ts else [0] * len(packed) for ts in (packed, t_accum, exp, e_accum)]
    rows, programs = [], []
    for j, i in enumerate(ids):
        n, k = packed[i].shape[0], ks[i]
        blocks = cdiv(cdiv(k, 8), block_o)
        seed = seeds[i] if stochastic else 0
        rows.append((sum(programs), n, k, packed_width(k), counter_layout(k, counter_bits)[1], n_groups(k, group_size),
                     blocks, off_p[j], off_t[j], off_g[j], off_e[j], off_b[j], *(o[i] for o in out_offsets),
                     seed >> 16, seed & 0xFFFF))
        programs.append(cdiv(n, block_r) * blocks)
    counts = torch.zeros((2, sum(programs)), dtype=torch.int32, device=in_packed.device)
    _fused_group_kernel[(sum(programs),)](
        *group_table(rows, programs, in_packed.device), in_packed, in_t, in_grad, step, cutoff, in_exp, in_b,
        flats[0], flats[2] if not stochastic else flats[0], flats[1], flats[3], counts[0], counts[1], flip_threshold,
        exp_threshold, GS=group_size, BLOCK_R=block_r, BLOCK_O=block_o, STOCHASTIC=stochastic,
        NIBBLES=not stochastic and counter_bits == 4, K_ALIGN=min(16, min(k & -k for k in pick(ks))), num_warps=warps)
    return counts


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
    buffer at once, then one launch of the fused kernel per group size over all its weights
    (:func:`launch_fused_group`), the counts summed once per launch; weights of group sizes the fused kernel does
    not take run the two-kernel update and are copied into place."""
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
    flips = torch.zeros((), dtype=torch.int64, device=packed[0].device)
    moves = flips.clone()
    for gs in sorted({group_sizes[i] for i in live if fuses(group_sizes[i])}):
        counts = launch_fused_group([i for i in live if group_sizes[i] == gs], packed, exp, t_accum, e_accum, grad,
                                    step, cutoff, ks, gs, flip_threshold, exp_threshold, counter_bits, seeds, flats)
        flips, moves = flips + counts[0].sum(dtype=torch.int64), moves + counts[1].sum(dtype=torch.int64)
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
