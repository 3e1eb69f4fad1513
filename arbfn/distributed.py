"""Data-parallel training on torch.distributed: ranks exchange ternary gradient votes, not float gradients.

Every rank holds the whole state and draws the same global batch stream; rank r trains on rows
[r*b, (r+1)*b) with b = batch_size / world_size. A step (:func:`data_parallel_step`):

1. ``gradient_signals`` on the rank's shard, then the vote s = sign(dL/dW) in {-1, 0, +1} per weight
   (NaN votes 0, as in the update op);
2. the votes are exchanged (:func:`exchange_votes`) so every rank holds the same result: ``"trits"``
   (default) packs votes 5 per byte, all_to_all hands each rank one slice of every rank's votes, the rank
   sums its slice and keeps the sign (the majority vote), packs it again and all_gathers the slices;
   ``"int8"`` all-reduces int8 votes (sum). The update op reads only the sign of its gradient input
   (kernels/update.py), so the majority sign and the vote sum give the same update, bit for bit;
   ``"fp32"`` all-reduces the fp32 gradients themselves (sum), for chain flips, which weigh each vote by its
   gradient's magnitude (:func:`check_update`); with counter or stochastic flips it votes the sign of the summed
   gradient instead of the majority of the ranks' signs;
3. the counters' integer evidence (VQ indices, memory slots) is all-gathered and concatenated along the
   batch in rank order, and the scalar loss terms are averaged (for logging);
4. ``finish_step`` with those: every rank applies the same update, so the state stays bit-identical.

The reference a W-rank step equals: one process that runs ``gradient_signals`` on each shard, sums the
shards' votes, concatenates their evidence and calls ``finish_step`` (tests/arbfn/test_distributed.py).
With one rank (or no process group) the step equals ``train_step``.

Bytes one rank sends per step (:func:`wire_bytes`), for L votes on W ranks, ring/pairwise algorithms as
NCCL and gloo run them: trits 2·(W−1)·R·512 with R = ceil(L / (2560·W)) rows of 512 bytes per slice
(≈ 0.4·L·(W−1)/W); int8 2·(W−1)·ceil(L/W); fp32 (the exchange, and the baseline) 2·(W−1)·ceil(L/W)·4. So
trits send ≈ 20× fewer bytes than an fp32 all-reduce at any W, int8 4×. Evidence adds (W−1)·4·E for E int32
entries per rank and the averaged scalars 2·(W−1)·ceil(S/W)·8.

A collective that fails because a peer died or did not answer within the process group's timeout
raises :class:`PeerFailure` (gloo); with NCCL, torch's watchdog aborts the rank after the same timeout (not
yet exercised on GPUs).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from arbfn import checkpoint
from arbfn.config import Config, UpdateConfig
from arbfn.model import State
from arbfn.objective import as_batch
from arbfn.train import finish_step, gradient_signals, train
from kernels.packing import pack, unpack

EXCHANGES = ("trits", "int8", "fp32")
ROW_BYTES = 512  # packed votes travel as rows of 512 bytes (2560 trits): short kernel grids, little padding
ROW_TRITS = 5 * ROW_BYTES
DEFAULT_TIMEOUT_S = 300.0
MAX_INT8_WORLD = 127  # an int8 vote sum of more ranks could wrap


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the process group's timeout."""


def launched() -> bool:
    """Whether this process is a rank that torchrun (or an equivalent launcher) described in the environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_size() -> int:
    """Ranks in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 when there is none."""
    return dist.get_rank() if dist.is_initialized() else 0


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the job described by torchrun's environment: NCCL on ``cuda:LOCAL_RANK``, else gloo on the CPU.

    ``timeout_s`` bounds how long any collective waits for a peer before failing."""
    if not launched():
        raise RuntimeError("arbfn.distributed.init needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        dev, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module *argv`` as ``nproc`` local ranks through torch.distributed.run; its exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    return subprocess.call(cmd)


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo's connection and timeout errors (DistBackendError is one)
        raise PeerFailure(f"rank {rank()} of {world_size()}: {what} failed: a peer rank died or did not answer "
                          f"within the process group's timeout ({e})") from e


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    # all_gather_single is the name on torch >= 2.13; the GPU image's torch 2.11 has all_gather_into_tensor
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp)


def check_update(update: UpdateConfig, exchange: str) -> None:
    """ValueError unless ``exchange`` carries what the update rule reads: chain flips (``flip_mode`` "chain") weigh
    each vote by its gradient's magnitude, so they need the fp32 gradients; the vote exchanges carry signs only."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if update.flip_mode == "chain" and exchange != "fp32":
        raise ValueError(f"chain flips weigh votes by gradient magnitudes, and the {exchange!r} exchange carries only "
                         "their signs: use exchange 'fp32' (--exchange fp32)")


def check_batch_size(batch_size: int, world: int) -> int:
    """Rows per rank; ValueError unless the global batch splits evenly over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of the world size {world} "
                         "(every rank trains on an equal shard)")
    return batch_size // world


def shard(batch: Any, index: int, world: int) -> dict[str, torch.Tensor]:
    """Rows [index*b, (index+1)*b) of every tensor of ``batch`` (ids or a batch dict), b = batch / world."""
    b = as_batch(batch)
    rows = b["bytes"].shape[0]
    per = check_batch_size(rows, world)
    if not 0 <= index < world:
        raise ValueError(f"shard index {index} is outside 0..{world - 1}")
    for k, v in b.items():
        if v.shape[0] != rows:
            raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows, 'bytes' has {rows}")
    return {k: v[index * per:(index + 1) * per] for k, v in b.items()}


def _votes(g: torch.Tensor) -> torch.Tensor:
    """sign(g) as int8, flattened; NaN votes 0 like the update op."""
    return ((g > 0).to(torch.int8) - (g < 0).to(torch.int8)).reshape(-1)


def _majority_trits(flat: torch.Tensor, world: int) -> torch.Tensor:
    """The sign of the sum over ranks of ``flat`` (int8 votes), through packed all_to_all + all_gather."""
    rows = -(-flat.numel() // (ROW_TRITS * world))  # rows of one rank's slice
    padded = torch.zeros(world * rows * ROW_TRITS, dtype=torch.int8, device=flat.device)
    padded[:flat.numel()] = flat
    sent = pack(padded.view(world * rows, ROW_TRITS))
    got = torch.empty_like(sent)
    with _collective("vote all_to_all"):
        dist.all_to_all_single(got, sent)
    total = unpack(got, ROW_TRITS).view(world, rows, ROW_TRITS).sum(0, dtype=torch.int32)
    mine = pack(total.sign().to(torch.int8))
    every = torch.empty_like(sent)
    with _collective("vote all_gather"):
        _all_gather(every, mine)
    return unpack(every, ROW_TRITS).view(-1)[:flat.numel()]


def exchange_votes(grads: Any, exchange: str = "trits") -> Any:
    """The tree of every rank's summed gradient votes (``"int8"``) or their sign (``"trits"``), as float, or of
    every rank's summed fp32 gradients (``"fp32"``).

    The vote exchanges drive the same update: the update op reads only the sign of its gradient input."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    leaves, spec = pytree.tree_flatten(grads)
    live = [g for g in leaves if g is not None]
    if not live:
        return grads
    world = world_size()
    if exchange == "fp32":
        flat = torch.cat([g.detach().to(torch.float32).reshape(-1) for g in live])
        if world > 1:
            with _collective("gradient all_reduce"):
                dist.all_reduce(flat)
        parts = iter(flat.split([g.numel() for g in live]))
        return pytree.tree_unflatten([None if g is None else next(parts).view(g.shape) for g in leaves], spec)
    flat = torch.cat([_votes(g) for g in live])
    if world > 1 and exchange == "trits":
        flat = _majority_trits(flat, world)
    elif world > 1:
        if world > MAX_INT8_WORLD:
            raise ValueError(f"int8 vote sums wrap above {MAX_INT8_WORLD} ranks (world {world}): use exchange='trits'")
        with _collective("vote all_reduce"):
            dist.all_reduce(flat)
    parts = iter(flat.split([g.numel() for g in live]))
    return pytree.tree_unflatten([None if g is None else next(parts).view(g.shape).to(g.dtype) for g in leaves],
                                 spec)


def exchange_aux(loss: torch.Tensor, aux: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over ranks, aux with scalar terms averaged and integer evidence concatenated in rank order)."""
    world = world_size()
    if world == 1:
        return loss, aux
    scalars = sorted(k for k, v in aux.items() if v.dim() == 0)
    evidence = sorted(k for k, v in aux.items() if v.dim() > 0)
    for k in evidence:
        if aux[k].is_floating_point() or aux[k].dtype == torch.bool:
            raise TypeError(f"aux[{k!r}] is counter evidence and must be integer, got {aux[k].dtype}")
    means = torch.stack([x.detach().to(torch.float64) for x in (loss, *(aux[k] for k in scalars))])
    with _collective("metric all_reduce"):
        dist.all_reduce(means)
    means /= world
    out = {k: means[i + 1].to(aux[k].dtype) for i, k in enumerate(scalars)}
    if evidence:
        flat = torch.cat([aux[k].reshape(-1).to(torch.int32) for k in evidence])  # ids are far below 2**31
        every = flat.new_empty(world * flat.numel())
        with _collective("evidence all_gather"):
            _all_gather(every, flat)
        parts = every.view(world, -1).split([aux[k].numel() for k in evidence], dim=1)
        for k, part in zip(evidence, parts):
            shape = aux[k].shape
            out[k] = part.reshape(world * shape[0], *shape[1:]).to(aux[k].dtype)
    return means[0].to(loss.dtype), out


def data_parallel_step(state: State, batch: Any, cfg: Config, exchange: str = "trits"
                       ) -> tuple[State, dict[str, torch.Tensor]]:
    """One training step of this rank on its shard of the global ``batch``; identical new state on every rank."""
    if cfg.model != state.config:
        raise ValueError("data_parallel_step: cfg.model differs from the state's model config")
    check_update(cfg.update, exchange)
    grads, loss, aux = gradient_signals(state, shard(batch, rank(), world_size()), cfg.train)
    votes = exchange_votes(grads, exchange)
    loss, aux = exchange_aux(loss, aux)
    return finish_step(state, votes, loss, aux, cfg)


def step_function(exchange: str = "trits") -> Callable[[State, Any, Config], tuple[State, dict[str, torch.Tensor]]]:
    """:func:`data_parallel_step` with ``exchange`` fixed: the ``step_fn`` of :func:`arbfn.train.train`."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return functools.partial(data_parallel_step, exchange=exchange)


def state_digest(state: State) -> str:
    """SHA-256 over every tensor of ``state`` (path, dtype, shape, bytes) in pytree order."""
    h = hashlib.sha256()
    for path, leaf in pytree.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().to("cpu").contiguous()
            h.update(f"{pytree.keystr(path)} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(state: State) -> str:
    """The state's digest; RuntimeError if any rank's digest differs (the replicas diverged)."""
    digest = state_digest(state)
    world = world_size()
    if world == 1:
        return digest
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=state.step.device)
    every = mine.new_empty(world * mine.numel())
    with _collective("replica check all_gather"):
        _all_gather(every, mine)
    seen = [bytes(r.tolist()).hex() for r in every.view(world, -1).cpu()]
    if len(set(seen)) != 1:
        raise RuntimeError(f"replicas diverged: state digests per rank {[d[:12] for d in seen]}")
    return digest


def train_data_parallel(cfg: Config, state: State, corpus: bytes, out_dir: Path | None = None,
                        on_step: Callable[[int, dict[str, float]], None] | None = None, exchange: str = "trits"
                        ) -> tuple[State, list[dict[str, float]]]:
    """:func:`arbfn.train.train` with the data-parallel step; only rank 0 writes metrics and calls ``on_step``.

    Ends by checking that every rank holds the same state."""
    check_update(cfg.update, exchange)
    check_batch_size(cfg.train.batch_size, world_size())
    lead = rank() == 0
    state, history = train(cfg, state, corpus, out_dir if lead else None, on_step if lead else None,
                           step_fn=step_function(exchange))
    check_replicas(state)
    return state, history


def save_checkpoint(state: State, path: str | Path, cfg: Config | None = None) -> Path:
    """Rank 0 writes the checkpoint (atomically, arbfn.checkpoint.save) once the replicas agree; all ranks wait."""
    check_replicas(state)
    if rank() == 0:
        checkpoint.save(state, path, cfg)
    if world_size() > 1:
        with _collective("checkpoint barrier"):
            dist.barrier()
    return Path(path)


def wire_bytes(world: int, num_votes: int, exchange: str, num_evidence: int = 0, num_scalars: int = 0
               ) -> dict[str, int]:
    """Bytes one rank sends per step, by part: votes for ``exchange`` (or ``"fp32"``, the all-reduce baseline
    of the same gradients), evidence (int32 entries per rank) and averaged scalars; formulas in the module doc."""
    if world < 1 or num_votes < 0 or num_evidence < 0 or num_scalars < 0:
        raise ValueError(f"need world >= 1 and non-negative counts, got {world}, {num_votes}, {num_evidence}, "
                         f"{num_scalars}")
    ring = 2 * (world - 1) * -(-num_votes // world)  # elements a rank sends in a ring all-reduce
    votes = {"trits": 2 * (world - 1) * -(-num_votes // (ROW_TRITS * world)) * ROW_BYTES,
             "int8": ring, "fp32": 4 * ring}
    if exchange not in votes:
        raise ValueError(f"exchange must be one of {tuple(votes)}, got {exchange!r}")
    return {"votes": votes[exchange], "evidence": (world - 1) * 4 * num_evidence,
            "scalars": 2 * (world - 1) * -(-num_scalars // world) * 8}
