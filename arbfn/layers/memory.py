"""Memory modules: MemGram (ternary slot memory), FocusGate and ConversationLSTM, and their bundle.

- **MemGram** reads one slot of a ternary embedding table per position: the slot whose row best
  matches a ternary key projection of ``x``. Its int16 ``strength`` counts how often each slot was
  read and decays with time; it is a usage statistic updated by :func:`update_memgram_counters` and
  does *not* mask the read (every slot stays readable, so a fresh memory with all strengths 0 works
  and the forward never depends on the counters).
- **FocusGate** mixes a read into the stream with a per-position sigmoid gate (a [1, 2d] ternary
  linear over ``[x, read]``).
- **ConversationLSTM** is a ternary LSTM cell over ``[x_t, h]`` run causally over positions. Its carry
  ``(h, c)`` is float *activation* state handed from one segment to the next by the caller; it is not a
  parameter and never enters the params tree (which stays integer-only).
"""

from __future__ import annotations

from typing import Any

import torch

from arbfn.checking import checking_data
from arbfn.ternary import TernaryWeight, embed, init_ternary, linear

Carry = tuple[torch.Tensor, torch.Tensor]
INT16_MAX = torch.iinfo(torch.int16).max


def _check_activations(x: torch.Tensor, d_model: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must be [B, T, {d_model}], got shape {tuple(x.shape)}")


# ---------------------------------------------------------------- MemGram


def init_memgram(d_model: int, n_slots: int, group_size: int, generator: torch.Generator | None) -> dict[str, Any]:
    """Key projection [d, d], slot table [n_slots, d] with unit-scale (2**0) rows, int16 strengths at 0."""
    slots = init_ternary(n_slots, d_model, group_size, generator, exponent=0)
    return {"key": init_ternary(d_model, d_model, group_size, generator),
            "slots": slots,
            "strength": torch.zeros(n_slots, dtype=torch.int16, device=slots.packed.device)}


def memgram(p: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x [B, T, d] -> (read [B, T, d], {"slot_indices": int64 [B, T]}).

    Scores ``q @ slots.T / sqrt(d)`` (q = key(x)) go through the linear op with the slot table as the
    weight; the argmax slot's row is gathered by the embedding op and scaled by its softmax weight, so
    the gradient reaches the key (through the weight) and the slots (through both ops).
    """
    d = p["key"].in_features
    _check_activations(x, d)
    scores = linear(p["slots"], linear(p["key"], x)) * d ** -0.5
    idx = scores.argmax(-1)
    weight = torch.softmax(scores, -1).gather(-1, idx.unsqueeze(-1))
    return embed(p["slots"], idx).to(x.dtype) * weight, {"slot_indices": idx}


def update_memgram_counters(p: dict[str, Any], aux: dict[str, torch.Tensor], decay_every: int,
                            step: torch.Tensor | int) -> dict[str, Any]:
    """MemGram params with strengths aged and bumped: a pure integer update, no data-dependent branch.

    At steps where ``(step + 1) % decay_every == 0`` (after every ``decay_every`` updates, counting
    from step 0) every strength first drops by 1, floored at 0; then each slot read at least once in
    ``aux`` gains 1 (once per update, however often it was read), saturating at the int16 maximum.
    """
    if isinstance(decay_every, bool) or not isinstance(decay_every, int) or decay_every < 1:
        raise ValueError(f"decay_every must be a positive int, got {decay_every!r}")
    step = torch.as_tensor(step)
    if step.dim() != 0 or step.is_floating_point() or step.dtype == torch.bool:
        raise TypeError(f"step must be an integer scalar, got {step.dtype} {tuple(step.shape)}")
    strength = p["strength"]
    idx = aux["slot_indices"]
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"slot_indices must be integer, got {idx.dtype}")
    if checking_data() and idx.numel() and (idx.min() < 0 or idx.max() >= strength.numel()):
        raise ValueError(f"slot_indices must lie in [0, {strength.numel()})")
    s = strength.to(torch.int32)
    decay = ((step.to(s.device) + 1) % decay_every == 0).to(torch.int32)
    s = (s - decay).clamp_min(0)
    touched = torch.zeros_like(s).index_fill(0, idx.reshape(-1).to(s.device), 1)
    return {**p, "strength": (s + touched).clamp_max(INT16_MAX).to(torch.int16)}


# ---------------------------------------------------------------- FocusGate


def init_focus_gate(d_model: int, group_size: int, generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """Gate projection [1, 2*d_model] over ``[x, read]``."""
    return {"w": init_ternary(1, 2 * d_model, group_size, generator)}


def focus_gate(p: dict[str, TernaryWeight], x: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """``x + sigmoid(w [x, read]) * read`` with one gate in (0, 1) per position."""
    d = p["w"].in_features // 2
    _check_activations(x, d)
    _check_activations(read, d, "read")
    if read.shape != x.shape:
        raise ValueError(f"read must match x's shape {tuple(x.shape)}, got {tuple(read.shape)}")
    return x + torch.sigmoid(linear(p["w"], torch.cat([x, read], -1))) * read


# ---------------------------------------------------------------- ConversationLSTM


def init_conversation_lstm(d_model: int, d_hidden: int, group_size: int,
                           generator: torch.Generator | None) -> dict[str, TernaryWeight]:
    """Gates [4*d_hidden, d_model + d_hidden] (rows: input, forget, cell, output) and out [d_model, d_hidden]."""
    return {"gates": init_ternary(4 * d_hidden, d_model + d_hidden, group_size, generator),
            "out": init_ternary(d_model, d_hidden, group_size, generator)}


def conversation_lstm(p: dict[str, TernaryWeight], x: torch.Tensor, carry: Carry | None = None
                      ) -> tuple[torch.Tensor, Carry]:
    """x [B, T, d] -> (y [B, T, d], (h, c) [B, d_hidden] each): a bias-free LSTM run over positions in order.

    ``carry=None`` starts from zeros; passing the returned carry to the next segment continues the
    recurrence exactly as if the segments were one sequence.
    """
    d_hidden = p["out"].in_features
    _check_activations(x, p["gates"].in_features - d_hidden)
    b = x.shape[0]
    if carry is None:
        h = c = x.new_zeros(b, d_hidden)
    else:
        if not isinstance(carry, tuple) or len(carry) != 2:
            raise TypeError("carry must be a tuple (h, c) or None")
        h, c = carry
        for name, t in (("h", h), ("c", c)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, d_hidden):
                raise ValueError(f"carry {name} must be a [{b}, {d_hidden}] tensor")
    hs = []
    for t in range(x.shape[1]):
        i, f, g, o = linear(p["gates"], torch.cat([x[:, t], h], -1)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    hidden = torch.stack(hs, 1) if hs else x.new_zeros(b, 0, d_hidden)
    return linear(p["out"], hidden), (h, c)


# ---------------------------------------------------------------- bundle


def init_memory(d_model: int, n_slots: int, d_hidden: int, group_size: int,
                generator: torch.Generator | None) -> dict[str, Any]:
    """MemGram, FocusGate and ConversationLSTM params under "memgram", "focus", "lstm"."""
    return {"memgram": init_memgram(d_model, n_slots, group_size, generator),
            "focus": init_focus_gate(d_model, group_size, generator),
            "lstm": init_conversation_lstm(d_model, d_hidden, group_size, generator)}


def memory(p: dict[str, Any], x: torch.Tensor, carry: Carry | None = None
           ) -> tuple[torch.Tensor, Carry, dict[str, torch.Tensor]]:
    """``x + gate * memgram_read + lstm(x)``: (x_out [B, T, d], the LSTM carry, MemGram's aux). Causal."""
    read, aux = memgram(p["memgram"], x)
    y, new_carry = conversation_lstm(p["lstm"], x, carry)
    return focus_gate(p["focus"], x, read) + y, new_carry, aux


def update_memory_counters(p: dict[str, Any], aux: dict[str, torch.Tensor], decay_every: int,
                           step: torch.Tensor | int) -> dict[str, Any]:
    """The bundle with its MemGram strengths updated by :func:`update_memgram_counters`."""
    return {**p, "memgram": update_memgram_counters(p["memgram"], aux, decay_every, step)}
