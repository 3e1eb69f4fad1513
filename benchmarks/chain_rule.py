"""Research rule for issue 7, in pure torch: each weight a chain of S states, moved by votes with a probability
proportional to its gradient's magnitude, trained against the float twin by :func:`arbfn.compare.compare`.

    python -m benchmarks.chain_rule [--steps 200] [--settings 6:1:64,6:1:64:frozen,3:0:64] [--seeds 1234]
        [--group-size 64] [--json]

A setting is ``states:scale:final[:power][:flag...]``. ``states`` S = 3 * 2**b: three equal levels (read as trits -1,
0, +1) of 2**b places each, so a weight keeps b bits beside its trit (S 3: none, the counter-free rule; S 6: one bit,
0.125 bytes/weight). A vote (the sign of -dL/dW) moves the place one step along the chain with probability
``p * a(step)``: p = min(1, |g| / (scale * max |g| of the weight's exponent group)) ** power (``scale`` 0: p = 1,
every vote alike; ``power`` 1 unless given: a higher power moves mostly the weights with the group's largest
gradients; the ``rms`` flag puts the group's root mean square |g| in place of its max), and a(step) falls from 1 at
step 0 to 1/``final`` at the run's end, geometrically (``final ** -(step / steps)``) unless the ``cosine`` flag
gives a cosine from 1 to 1/``final``. Flags: ``frozen`` leaves the exponents at their initial values (no exponent
accumulator needed; otherwise they move by the library's rule, ``arbfn::ternary_update_group`` with a zero flip
cutoff, which moves no trit); ``outer`` starts each nonzero trit at the outer place of its level, where a vote
toward zero must move it twice to change it (zero trits start uniform over their places, as every trit does
without the flag); ``fixed-norms`` trains no norm gain (weights under a key ``norm...``, all +1 from init): they
keep their init.

The places live in this script, not in the state, and the draws come from torch's generator: a prototype to
measure rules before they get a layout and a kernel. Its best setting,
``6:2:128:3:frozen:outer:cosine:fixed-norms:rms`` at ``--group-size 64``, is now the library's flip mode "chain"
(``UpdateConfig(flip_mode="chain")``, kernels/update_chain.py), with hashed draws instead of torch's generator.
bytes/weight counts the state as the rule would keep it: the audit's bytes, plus b bits per trainable weight, less
the exponent accumulators when frozen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from arbfn import data
from arbfn.audit import audit
from arbfn.compare import byte_path_config, compare
from arbfn.config import Config, UpdateConfig, preset
from arbfn.model import State, init_model, is_norm_gain
from arbfn.ternary import TernaryWeight, is_ternary, update_weights, weights, weights_with_grads
from arbfn.train import finish_step, gradient_signals
from kernels.packing import pack_reference, unpack_reference


@dataclasses.dataclass(frozen=True)
class ChainRule:
    """One setting: chain length, magnitude scale (0: constant), final rate divisor, frozen exponents, the power of
    the magnitude ratio, and the flags of the module docstring (outer starts, a cosine rate, fixed norm gains, the
    group's root mean square for its max)."""

    states: int = 6
    scale: float = 1.0
    final: float = 64.0
    frozen: bool = False
    power: float = 1.0
    outer: bool = False
    cosine: bool = False
    fixed_norms: bool = False
    rms: bool = False

    def __post_init__(self) -> None:
        b = self.place_bits
        if self.states != 3 * 2**b:
            raise ValueError(f"states must be 3 * 2**b (3, 6, 12, 24, ...), got {self.states}")
        if self.scale < 0 or not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite and >= 0 (0: every vote alike), got {self.scale}")
        if not (self.final >= 1 and math.isfinite(self.final)):
            raise ValueError(f"final must be a finite divisor >= 1, got {self.final}")
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be finite and > 0, got {self.power}")

    @property
    def place_bits(self) -> int:
        """Bits each weight keeps beside its trit: log2 of the places per level."""
        return max(0, (self.states // 3).bit_length() - 1)


FLAGS = {"frozen": "frozen", "outer": "outer", "cosine": "cosine", "fixed-norms": "fixed_norms",  # flag: field
         "rms": "rms"}


def parse_setting(text: str) -> ChainRule:
    """``"states:scale:final[:power][:flag...]"`` (flags: :data:`FLAGS`, each at most once) as a ChainRule."""
    parts = text.split(":")
    numbers = parts[:next((i for i, x in enumerate(parts) if x in FLAGS), len(parts))]
    flags = parts[len(numbers):]
    if len(numbers) not in (3, 4) or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags):
        raise ValueError(f"a setting is states:scale:final[:power][:flag...] with flags from {sorted(FLAGS)}, "
                         f"got {text!r}")
    power = float(numbers[3]) if len(numbers) == 4 else 1.0
    return ChainRule(int(numbers[0]), float(numbers[1]), float(numbers[2]), power=power,
                     **{FLAGS[f]: True for f in flags})


def trits_of(places: torch.Tensor, states: int) -> torch.Tensor:
    """The trit (-1, 0, +1) each place in 0..states-1 reads as: its level among three equal ones."""
    return places * 3 // states - 1


def start_places(trits: torch.Tensor, states: int, generator: torch.Generator, outer: bool = False) -> torch.Tensor:
    """Places uniform within each trit's level (int64, the trits' shape); with ``outer``, nonzero trits at the
    outer end of theirs (the first place of -1's level, the last of +1's)."""
    per = states // 3
    t = trits.to(torch.int64)
    offset = torch.randint(0, per, trits.shape, generator=generator)
    if outer:
        offset = torch.where(t > 0, per - 1, torch.where(t < 0, 0, offset))
    return (t + 1) * per + offset


def move_probability(grad: torch.Tensor, group_size: int, scale: float, power: float = 1.0,
                     rms: bool = False) -> torch.Tensor:
    """(|g| / (scale * max |g| of its group of ``group_size`` columns, or with ``rms`` the group's root mean square
    over its real columns), at most 1) ** power; all ones for scale 0."""
    if scale == 0:
        return torch.ones_like(grad, dtype=torch.float32)
    a = grad.abs().float()
    n, k = a.shape
    groups = F.pad(a, (0, -k % group_size)).view(n, -1, group_size)
    if rms:
        width = (k - torch.arange(groups.shape[1], device=a.device) * group_size).clamp(max=group_size)
        norm = (groups.square().sum(2) / width).sqrt()
    else:
        norm = groups.amax(2)
    top = norm[:, torch.arange(k, device=a.device) // group_size]  # each column's group norm
    return torch.where(top > 0, a / (scale * top), 0.0).clamp(max=1.0) ** power


def step_places(places: torch.Tensor, grad: torch.Tensor, p: torch.Tensor, states: int,
                generator: torch.Generator) -> torch.Tensor:
    """Each place moved one step along -sign(grad) where a uniform draw falls below ``p``, kept in the chain."""
    go = torch.rand(grad.shape, generator=generator) < p
    vote = -torch.sign(grad).to(torch.int64)
    return (places + vote * go).clamp(0, states - 1)


class ChainTrainer:
    """A ``step_fn`` for :func:`arbfn.compare.compare` that trains the ternary side by a :class:`ChainRule`."""

    def __init__(self, rule: ChainRule, steps: int, seed: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.rule, self.steps = rule, steps
        self.generator = torch.Generator().manual_seed(seed)
        self.places: dict[int, torch.Tensor] = {}
        self.norms: set[int] | None = None  # numbers of the norm gains, found on the first step

    def rate(self, step: int) -> float:
        """a(step): 1 at step 0, falling to 1/final at the run's end, as final ** -(step / steps) or, with the cosine
        flag, 1/final + (1 - 1/final) * (1 + cos(pi * step / steps)) / 2."""
        t, last = min(step, self.steps) / self.steps, 1 / self.rule.final
        return last + (1 - last) * (1 + math.cos(math.pi * t)) / 2 if self.rule.cosine else self.rule.final ** -t

    def update_weight(self, number: int, w: TernaryWeight, grad: torch.Tensor, a: float) -> TernaryWeight:
        """``w`` with its trits read from its chain after one vote."""
        states = self.rule.states
        if number not in self.places:
            self.places[number] = start_places(unpack_reference(w.packed, w.in_features), states, self.generator,
                                               self.rule.outer)
        p = move_probability(grad, w.group_size, self.rule.scale, self.rule.power, self.rule.rms) * a
        self.places[number] = step_places(self.places[number], grad, p, states, self.generator)
        return dataclasses.replace(w, packed=pack_reference(trits_of(self.places[number], states).to(torch.int8)))

    def update(self, state: State, grads: Any, update: UpdateConfig) -> tuple[State, dict[str, torch.Tensor]]:
        """An :data:`arbfn.train.UpdateFn`: exponents by the library's rule unless frozen, trits by the chains."""
        ws, gs, rebuild = weights_with_grads(state.params, grads)
        stats: dict[str, torch.Tensor] = {}
        if not self.rule.frozen:  # a zero cutoff moves no trit
            zero = torch.zeros((), dtype=torch.int64)
            ws, _, stats["exp_moves"] = update_weights(ws, gs, 1, update.exp_threshold, state.step, cutoff=zero)
        a = self.rate(int(state.step))
        if self.norms is None:
            self.norms = norm_gains(state.params) if self.rule.fixed_norms else set()
        new = [w if g is None or not w.trainable or number in self.norms else self.update_weight(number, w, g, a)
               for number, (w, g) in enumerate(zip(ws, gs))]
        return State(rebuild(new), state.step + 1, state.config), stats

    def __call__(self, state: State, batch: torch.Tensor, cfg: Config) -> tuple[State, dict[str, torch.Tensor]]:
        grads, loss, aux = gradient_signals(state, batch, cfg.train)
        return finish_step(state, grads, loss, aux, cfg, update=self.update)


def flags_of(rule: ChainRule) -> str:
    """The rule's flags as a setting spells them, or "-" for none."""
    return ":".join(f for f, field in FLAGS.items() if getattr(rule, field)) or "-"


def norm_gains(params: Any) -> set[int]:
    """Numbers (pytree order, as :func:`arbfn.ternary.weights` lists them) of the weights under a key ``norm...``."""
    leaves = pytree.tree_flatten_with_path(params, is_leaf=is_ternary)[0]
    return {i for i, path in enumerate(path for path, x in leaves if is_ternary(x)) if is_norm_gain(path)}


def bytes_per_weight(state: State, rule: ChainRule) -> float:
    """State bytes per ternary weight as the rule would keep them (module docstring): fixed norm gains keep neither
    places nor an exponent accumulator."""
    report = audit(state)
    fixed = norm_gains(state.params) if rule.fixed_norms else set()
    trained = [(i in fixed, w) for i, w in enumerate(weights(state.params)) if w.trainable]
    extra = sum(w.out_features * -(-w.in_features * rule.place_bits // 8) for is_fixed, w in trained if not is_fixed)
    extra -= sum(w.e_accum.numel() for is_fixed, w in trained if rule.frozen or is_fixed)
    return (report["state_bytes"] + extra) / report["ternary_weights"]


def run(rule: ChainRule, steps: int, seed: int, preset_name: str = "tiny", group_size: int | None = None) -> dict:
    """One compare run of ``rule`` (counter-free state layout, so no flip counters are built); ``group_size``
    replaces the preset's exponent group size (None keeps it)."""
    cfg = preset(preset_name)
    model = cfg.model if group_size is None else dataclasses.replace(cfg.model, group_size=group_size)
    cfg = dataclasses.replace(cfg, model=model, update=UpdateConfig(flip_mode="stochastic"))
    result = compare(cfg, data.load_corpus(), steps, eval_every=max(1, steps // 4),
                     step_fn=ChainTrainer(rule, steps, seed))
    layout = init_model(byte_path_config(cfg), torch.Generator().manual_seed(0))  # training keeps the layout
    return {"rule": dataclasses.asdict(rule), "seed": seed, "steps": steps, "group_size": model.group_size,
            "bpb_ternary": result["bpb_ternary"], "bpb_float": result["bpb_float"], "ratio": result["ratio"],
            "bytes_per_weight": bytes_per_weight(layout, rule), "curve": result["curves"]["ternary"]}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every setting at every seed, print the table (or JSON lines)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--settings", default="6:1:64,6:1:64:frozen,3:0:64")
    p.add_argument("--seeds", default="1234", help="comma-separated generator seeds (places and draws)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--group-size", type=int, default=None, help="exponent group size (default: the preset's)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    a = p.parse_args(argv)
    rules = [parse_setting(s) for s in a.settings.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.json:
        print(f"{a.preset} byte path vs float twin, {a.steps} steps, CPU")
        print("| states | bits beside the trit | scale | power | final | flags | group | seed | bpb ternary "
              "| bpb float | ratio | bytes/weight |")
        print("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for rule in rules:
        for seed in seeds:
            r = run(rule, a.steps, seed, a.preset, a.group_size)
            if a.json:
                print(json.dumps(r))
                continue
            print(f"| {rule.states} | {rule.place_bits} | {rule.scale:g} | {rule.power:g} | {rule.final:g} | "
                  f"{flags_of(rule)} | {r['group_size']} | {seed} | {r['bpb_ternary']:.4f} | "
                  f"{r['bpb_float']:.4f} | {r['ratio']:.3f} | {r['bytes_per_weight']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
