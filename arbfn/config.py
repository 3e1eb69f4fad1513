"""Dataclass configs and named presets.

``tiny`` trains on 2 CPU cores in seconds (tests, CI, the default job); larger presets arrive with the
whole-model work. Every knob of the sign-vote update lives in :class:`UpdateConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from arbfn.data import VOCAB_SIZE
from kernels.update import ANNEAL_SHAPES, check_flip_schedule

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # TrainConfig.compute_dtype


def _check_positive(obj: Any) -> None:
    """Every int field of a config dataclass must be >= 1 (bools are switches, floats are checked apart)."""
    for field in dataclasses.fields(obj):
        v = getattr(obj, field.name)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"{type(obj).__name__}.{field.name} must be >= 1, got {v}")


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Shared VQ codebook: ``n_codes`` ternary codes of ``code_dim``; exact lookup up to ``exact_limit`` codes,
    candidate lookup (``n_candidates`` per query from the sign pattern) above."""

    code_dim: int = 16
    n_codes: int = 256
    exact_limit: int = 65536
    n_candidates: int = 64

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Graph over the VQ codes: node width, out-edges per node, ACT hop limit."""

    d_node: int = 32
    edges_per_node: int = 4
    max_hops: int = 3

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """MemGram slots, ConversationLSTM width, integer strength decay period (steps)."""

    n_slots: int = 64
    d_hidden: int = 32
    decay_every: int = 16

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Experts, top-k routing, expert MLP width, ACT iteration limit, dense-dispatch token limit."""

    n_experts: int = 4
    top_k: int = 2
    d_ff: int = 64
    max_steps: int = 2
    dense_limit: int = 128

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """VideoHead denoise-loop limit, TalkerHead vocabulary (audio codec tokens) and repeat stride."""

    video_max_steps: int = 4
    talker_tokens: int = 289
    talker_stride: int = 2

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class SequencerConfig:
    """Image and audio sequencers: the width of the sidecar features they take (DINOv2-small 384,
    Moonshine-base 416; tiny sidecars differ, so derive them with ``arbfn.multimodal.sequencer_config``) and
    their window over feature positions (image: width 3, valid, so 256 patches give 254 positions; audio:
    one frame per position)."""

    image_features: int = 384
    image_window: int = 3
    audio_features: int = 416
    audio_window: int = 1

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the ARB model and its switches.

    Always present: text sequencer -> causal ternary blocks -> RMSNorm -> output router with byte head,
    VideoHead and TalkerHead. Switches add the memory modules, the shared VQ (via the multimodal
    bridge), the graph over VQ codes (needs VQ) and the MoE ACT stage; ``enable_image``/``enable_audio``
    add the image/audio sequencers over frozen sidecar features (``sequencers``), whose positions precede
    the text in one sequence.
    """

    vocab_size: int = VOCAB_SIZE
    d_embed: int = 64
    window: int = 3
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_context: int = 64
    group_size: int = 32
    act_threshold: float = 0.99
    enable_vq: bool = False
    enable_graph: bool = False
    enable_memory: bool = False
    enable_moe: bool = False
    enable_image: bool = False
    enable_audio: bool = False
    vq: VQConfig = VQConfig()
    graph: GraphConfig = GraphConfig()
    memory: MemoryConfig = MemoryConfig()
    moe: MoEConfig = MoEConfig()
    heads: HeadsConfig = HeadsConfig()
    sequencers: SequencerConfig = SequencerConfig()

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 < self.act_threshold <= 1.0:
            raise ValueError(f"act_threshold must be in (0, 1], got {self.act_threshold}")
        if self.enable_graph and not self.enable_vq:
            raise ValueError("enable_graph needs enable_vq: graph nodes are VQ codes")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``dataclasses.asdict``; unknown or missing fields raise."""
        subs = {"vq": VQConfig, "graph": GraphConfig, "memory": MemoryConfig, "moe": MoEConfig, "heads": HeadsConfig,
                "sequencers": SequencerConfig}
        return cls(**{k: subs[k](**v) if k in subs else v for k, v in d.items()})


FLIP_MODES = ("counter", "stochastic", "chain")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """The sign-vote rule (SYSTEM.md §Training, kernels/update.py).

    flip_mode: "counter" keeps an int8 vote accumulator per weight (1 byte/weight of state) and moves a trit
      when ``flip_threshold`` net votes agree; "stochastic" keeps none (about 0.3 bytes/weight in all) and
      moves a trit on each vote with probability 1/``flip_threshold``, drawn from a counter-based hash of
      (``seed``, step, tensor, weight), so a step stays a pure function of (state, batch, config). Counter
      mode learns better (tiny byte path, held-out bits/byte at 200 steps: 3.45 vs 4.29 for stochastic θ 64 with
      exp θ 127, 3.82 vs 4.34 with exp θ 32; benchmarks/RESULTS.md), so it stays the default. "chain" keeps one
      place bit per weight beside its trit (kernels/update_chain.py): a weight is a chain of six places, two per
      trit level, and a vote moves its place one step with probability min(1, |g| / (``chain_scale`` * the rms
      |g| of its exponent group)) ** ``chain_power`` / θ, drawn from the same hash as "stochastic". Exponents stay
      at their initial values (no exponent accumulator), and a fresh state starts each nonzero trit at the outer
      place of its level. With ``fixed_norm_gains`` (as every chain figure here was measured) and
      ``group_size`` 64 that is 0.344 bytes/weight on tiny's byte path (0.384 on the whole preset, whose graph and
      VQ keep their own counters); with θ 1 -> 128 on a cosine over the run it learns to 1.131-1.145x the float
      twin there, five runs (1.22x at 400 steps; benchmarks/RESULTS.md, "The chain as a flip mode"). Every
      device runs its pure-torch update for now (its Triton kernel has not yet run on a GPU).
    flip_threshold: net votes per trit move (1..127; at most 7 with 4-bit counters; up to 2**24 for stochastic
      flips, which move a trit on a vote with probability 1/θ and need no counter to hold θ). 16 with dithered
      counters learned best on the tiny byte path (200 steps, held-out bits/byte vs the float twin: θ 8 1.17×,
      12 1.18×, 16 1.14×, 24 1.17×; benchmarks/RESULTS.md).
    exp_threshold: votes before a group's log2 scale moves by one (1..127). A move doubles or halves
      a whole group, so it needs far more evidence than a flip: at the original's 4 the tiny model's loss
      blew up within 50 steps (6.1 -> 240 nats). At 32 (the old default) tiny trained smoothly, but the small
      byte path collapsed after step 700 of 1000 on the GPU (held-out 2.92 -> 6.26 bits/byte); at 96 and 127
      it fell steadily to 2.60 and 2.58, below the float twin's 3.17-3.32. 127, the int8 accumulator's limit,
      is the default: best of 32/96/127 on the tiny byte path at 200 and 400 steps (1.086x and 1.161x the float
      twin, against 1.135x and 1.234x at 32) and on small. Slower still (exponent votes counted every second
      step, about θE 254) was worse: 1.115x and 1.181x (benchmarks/RESULTS.md, "Exponent threshold").
    counter_bits: counter mode only: the width of each flip counter. 8 (default) is an int8 per weight; 4 packs
      two signed nibbles per byte (``t_accum`` uint8 [N, ceil(K/2)], kernels/update.py
      ``arbfn::ternary_update_nibble``), half a byte per weight less, and needs ``flip_threshold`` <= 7. The
      rule is the same; only the counter's range shrinks, so 4-bit runs are the 8-bit runs at θ <= 7, bit for
      bit. That lower θ costs learning (tiny byte path, held-out bits/byte vs the float twin, 200 steps, exp θ 32:
      4-bit θ 4 1.26×, 5 1.21×, 6 1.18×, 7 1.155× against 1.135× for 8-bit θ 16; 400 steps, θ 7: 1.38× vs
      1.23×; exp θ 127, 200 steps: θ 7 1.144× vs 1.086×; benchmarks/RESULTS.md), so 8 stays the default; 4 is
      an option for memory-bound runs (0.81 vs 1.31 bytes/weight of state on the whole tiny preset).
    seed: the stochastic and chain flips' stream (0..2**32-1); unused by counter mode.
    flip_threshold_final, anneal_steps: stochastic and chain modes: θ anneals from ``flip_threshold`` at step 0 to
      ``flip_threshold_final`` at step ``anneal_steps`` and stays there (0, 0: θ constant). At a fixed θ
      a vote moves its trit with probability 1/θ however evenly the weight's votes split, so counter-free
      learning stops improving (d256 byte path: 4.07 bits/byte at step 200, 4.13 at 400); a rising θ lowers
      that noise floor as the run goes on (kernels/update.py ``flip_cutoff``). Held-out bits/byte against the
      float twin (benchmarks/RESULTS.md, 2026-12-01): small byte path, 1000 steps, θ 64 -> 2048: 1.00x (θ 64
      constant: 1.22x; int8 counters 0.81x); d256, 400 steps: 1.25x (1.39x; counters 1.01x); tiny, 200 steps:
      1.30-1.42x for every schedule tried (1.35x; counters 1.09x).
    anneal_shape: how θ anneals: "geometric" (default), or "cosine": the move rate 1/θ falls on a half cosine
      from 1/θ0 to 1/θ1 (kernels/update.py ``flip_cutoff``), holding fast moves longer. The chain learns better
      with it (tiny, 200 steps, θ 1 -> 128: 1.144x the float twin against 1.176x geometric; benchmarks/RESULTS.md).
    fixed_norm_gains: every mode: the RMSNorm gains (weights under a ``norm...`` key, all +1 at init) keep their
      init and hold no accumulator, so the update never moves them (the float twin still trains its own). Default
      off. Measured on tiny, 200 steps (benchmarks/RESULTS.md, "The chain as a flip mode"): counter-free flips θ 1
      -> 64, update seeds 0 / 1 / 2: 1.307x / 1.296x / 1.318x the float twin against 1.335x / 1.339x / 1.318x
      trained; the chain prototype 1.176x against 1.180x (1.167x against 1.168x with outer starts); int8 counters
      1.087x against 1.084x (no gain).
    chain_scale, chain_power: chain mode only (module kernels/update_chain.py): a gradient moves its place with
      probability min(1, |g| / (chain_scale * its group's rms |g|)) ** chain_power (times 1/θ). A power above 1
      moves mostly the group's largest gradients; measured on tiny with outer starts and fixed norms (200 steps,
      θ 1 -> 64 on a cosine): scale 1.5 / 2 / 2.5 at power 3: 1.162x / 1.146x / 1.148x; power 2 / 3 / 4 / 5 at
      scale 2: 1.158x / 1.146x / 1.139x / 1.156x.
    dither: counter mode only: a fresh state's flip counters start uniform in [-(θ-1), θ-1] (drawn from the
      init generator) instead of 0. From zeros, every weight whose gradient sign holds for θ steps flips at
      step θ at once (1.6M trits of the small model at step 8, which blew up its multimodal losses); dithered
      starts spread the first flips over steps 1..2θ-1 (tiny byte path, 200 steps, θ 8: 3.73 vs 3.82 bits/byte;
      θ 16: 3.61-3.63 vs 4.32; whole tiny preset, 100 steps, θ 8: 3.87 vs 4.45).

    Warm-up has no knob of its own: exponent accumulators start at 0, so no exponent moves before step
    ``exp_threshold`` (127 steps by default), and ``dither`` spreads the first flips. An extra exponent freeze
    for the first 50 or 100 steps was measured worse (tiny byte path, 200 steps: 1.116x / 1.115x the float
    twin against 1.086x: the default's first exponent moves, after step 127, are worth 0.09 bits/byte).
    """

    flip_threshold: int = 16
    exp_threshold: int = 127
    flip_mode: str = "counter"
    seed: int = 0
    dither: bool = True
    counter_bits: int = 8
    flip_threshold_final: int = 0
    anneal_steps: int = 0
    anneal_shape: str = "geometric"
    chain_scale: float = 2.0
    chain_power: float = 3.0
    fixed_norm_gains: bool = False

    def __post_init__(self) -> None:
        if self.flip_mode not in FLIP_MODES:
            raise ValueError(f"UpdateConfig.flip_mode must be one of {FLIP_MODES}, got {self.flip_mode!r}")
        if self.anneal_shape not in ANNEAL_SHAPES:
            raise ValueError(f"UpdateConfig.anneal_shape must be one of {ANNEAL_SHAPES}, got {self.anneal_shape!r}")
        for name in ("chain_scale", "chain_power"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"UpdateConfig.{name} must be a positive finite number, got {value!r}")
            if self.flip_mode != "chain" and value != getattr(UpdateConfig, name):
                raise ValueError(f"UpdateConfig.{name} shapes chain flips; flip_mode {self.flip_mode!r} has none "
                                 "(set flip_mode='chain' or leave it at its default)")
        if not 1 <= self.exp_threshold <= 127:
            raise ValueError(f"UpdateConfig.exp_threshold must be in 1..127 (an int8 accumulator), got "
                             f"{self.exp_threshold}")
        if self.flip_counters and not 1 <= self.flip_threshold <= 127:
            raise ValueError(f"UpdateConfig.flip_threshold must be in 1..127 (an int8 counter), got "
                             f"{self.flip_threshold}")
        if self.flip_counters and (self.flip_threshold_final or self.anneal_steps or self.anneal_shape != "geometric"):
            raise ValueError("UpdateConfig.flip_threshold_final, anneal_steps and anneal_shape anneal drawn flips; "
                             "counter mode has no schedule (set flip_mode='stochastic' or 'chain', or leave them at "
                             "their defaults)")
        if not self.flip_counters:  # θ up to 2**24 (a 24-bit draw), and the schedule's ints
            try:
                check_flip_schedule(self.flip_threshold, self.flip_threshold_final, self.anneal_steps)
            except ValueError as e:
                raise ValueError(f"UpdateConfig.{e}") from None
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"UpdateConfig.seed must be in 0..2**32-1, got {self.seed}")
        if self.counter_bits not in (8, 4):
            raise ValueError(f"UpdateConfig.counter_bits must be 8 or 4, got {self.counter_bits}")
        if self.flip_counters and self.counter_bits == 4 and self.flip_threshold > 7:
            raise ValueError(f"UpdateConfig.flip_threshold must be at most 7 with 4-bit counters (a signed nibble "
                             f"holds -8..7), got {self.flip_threshold}")

    @property
    def flip_counters(self) -> bool:
        """Whether the rule keeps a per-weight flip counter (``t_accum``) in the state."""
        return self.flip_mode == "counter"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch shape, length, seed, held-out split, and the dtype the forward computes in.

    compute_dtype: "float32" (default) or "bfloat16": the residual stream's dtype in the train step's forward
      (arbfn.model.forward ``dtype``; logits and the loss stay fp32), and the dtype of the probes, so the
      weight-gradient signals come out in it too (2 bytes per weight instead of 4; the update reads only their
      signs, which rounding to bf16 keeps). Every ternary weight is exact in bf16 (a trit times a power of two),
      so only activations round; bf16 halves activation traffic and runs the matmuls and attention at bf16
      tensor-core rates on a GPU (the float twin's autocast does the same).
    """

    batch_size: int = 16
    context: int = 64
    steps: int = 200
    seed: int = 0
    held_out_fraction: float = 0.1
    eval_batches: int = 8
    ponder_weight: float = 0.01  # weight of the ACT ponder cost (graph hops, MoE steps) in the loss
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.context < 2 or self.steps < 0:
            raise ValueError("TrainConfig needs batch_size >= 1, context >= 2 and steps >= 0")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def dtype(self) -> torch.dtype:
        """``compute_dtype`` as a torch dtype."""
        return COMPUTE_DTYPES[self.compute_dtype]


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
        return cls(name=d["name"], model=ModelConfig.from_dict(d["model"]), update=UpdateConfig(**d["update"]),
                   train=TrainConfig(**d["train"]))


PRESETS: dict[str, Config] = {
    "tiny": Config("tiny", ModelConfig(enable_vq=True, enable_graph=True, enable_memory=True, enable_moe=True),
                   UpdateConfig(), TrainConfig(batch_size=16, context=64, steps=200)),
    # The seeds' small text model with VQ, graph, memory, MoE and heads: about 40M ternary weights.
    "small": Config("small", ModelConfig(
        d_embed=128, d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_context=256,
        enable_vq=True, enable_graph=True, enable_memory=True, enable_moe=True,
        vq=VQConfig(code_dim=32, n_codes=8192), graph=GraphConfig(d_node=64, edges_per_node=10, max_hops=3),
        memory=MemoryConfig(n_slots=1024, d_hidden=256, decay_every=64),
        moe=MoEConfig(n_experts=8, top_k=2, d_ff=1280, max_steps=4), heads=HeadsConfig(video_max_steps=16)),
        UpdateConfig(), TrainConfig(batch_size=16, context=256, steps=1000)),
    # The 3B target's shape, for counting only (`arbfn audit --preset 3b` allocates nothing).
    "3b": Config("3b", ModelConfig(
        d_embed=512, d_model=2048, n_layers=28, n_heads=16, d_ff=8192, max_context=2048,
        enable_vq=True, enable_graph=True, enable_memory=True, enable_moe=True,
        vq=VQConfig(code_dim=64, n_codes=10_000_000, n_candidates=256),
        graph=GraphConfig(d_node=32, edges_per_node=10, max_hops=4),
        memory=MemoryConfig(n_slots=65536, d_hidden=1024, decay_every=256),
        moe=MoEConfig(n_experts=32, top_k=4, d_ff=2048, max_steps=4), heads=HeadsConfig(video_max_steps=50)),
        UpdateConfig(), TrainConfig(batch_size=8, context=2048, steps=1000)),
}


def preset(name: str) -> Config:
    """The named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
