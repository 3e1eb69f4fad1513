"""Dataclass configs and named presets.

``tiny`` trains on 2 CPU cores in seconds (tests, CI, the default job); larger presets arrive with the
whole-model work. Every knob of the sign-vote update lives in :class:`UpdateConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from arbfn.data import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the byte model: text sequencer -> causal ternary blocks -> byte head."""

    vocab_size: int = VOCAB_SIZE
    d_embed: int = 64
    window: int = 3
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_context: int = 64
    group_size: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"ModelConfig.{field.name} must be >= 1, got {getattr(self, field.name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """The sign-vote rule (SYSTEM.md §Training).

    flip_threshold: votes a trit's accumulator must gather before it moves one step (1..127); lower learns
      faster but flips in bursts. exp_threshold: votes before a group's log2 scale moves by one (1..127). A move doubles or halves
      a whole group, so it needs far more evidence than a flip: at the original's 4 the tiny model's loss
      blew up within 50 steps (6.1 -> 240 nats); at 32 it trains smoothly (benchmarks/RESULTS.md).
    """

    flip_threshold: int = 8
    exp_threshold: int = 32

    def __post_init__(self) -> None:
        for name in ("flip_threshold", "exp_threshold"):
            v = getattr(self, name)
            if not 1 <= v <= 127:
                raise ValueError(f"UpdateConfig.{name} must be in 1..127 (an int8 accumulator), got {v}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch shape, length, seed and held-out split."""

    batch_size: int = 16
    context: int = 64
    steps: int = 200
    seed: int = 0
    held_out_fraction: float = 0.1
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.context < 2 or self.steps < 0:
            raise ValueError("TrainConfig needs batch_size >= 1, context >= 2 and steps >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model shape, update rule, training loop."""

    name: str
    model: ModelConfig
    update: UpdateConfig = UpdateConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if self.train.context > self.model.max_context:
            raise ValueError(f"train.context {self.train.context} exceeds model.max_context {self.model.max_context}")

    def to_json(self) -> str:
        """Stable JSON (stored in checkpoints)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """Inverse of :meth:`to_json`; unknown or missing fields raise."""
        d: dict[str, Any] = json.loads(text)
        return cls(name=d["name"], model=ModelConfig(**d["model"]), update=UpdateConfig(**d["update"]),
                   train=TrainConfig(**d["train"]))


PRESETS: dict[str, Config] = {
    "tiny": Config("tiny", ModelConfig(), UpdateConfig(), TrainConfig(batch_size=16, context=64, steps=200)),
}


def preset(name: str) -> Config:
    """The named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
