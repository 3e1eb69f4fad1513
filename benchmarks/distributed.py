"""Data-parallel training: steps/s per world size and the bytes each rank sends per step, votes vs fp32.

    python -m benchmarks.distributed [--preset small] [--world-sizes 1,2] [--steps 20] [--batch-per-rank 16]

Runs each world size as local ranks through torchrun (NCCL on cuda:LOCAL_RANK when CUDA is there, else
gloo on CPU; NCCL_NVLS_ENABLE=0 and OMP_NUM_THREADS=1 unless set). The global batch is
``batch-per-rank × world`` (weak scaling), so "speedup" is global bytes/s over the 1-rank row. Bytes on the
wire are computed from the tensor sizes with :func:`arbfn.distributed.wire_bytes` (per rank per step:
trits 2(W−1)·R·512, R = ceil(L/(2560W)); int8 2(W−1)·ceil(L/W); fp32 all-reduce of the same gradients
2(W−1)·ceil(L/W)·4; evidence (W−1)·4·E); the exchange columns time one vote exchange and one fp32
all-reduce of L floats on the real process group (median of ``--reps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from arbfn import data
from arbfn import distributed as D
from arbfn.config import preset
from arbfn.model import init_model
from arbfn.ternary import to_device, weights
from arbfn.train import gradient_signals
from benchmarks._timing import device_sync

MB = 1e6


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, every rank starting together."""
    times = []
    for _ in range(reps):
        dist.barrier()
        device_sync(device)
        t0 = time.perf_counter()
        fn()
        device_sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(a: argparse.Namespace) -> None:
    """One rank: warm up, time ``a.steps`` data-parallel steps and the exchanges; rank 0 writes the result."""
    device = D.init(a.device)
    world = D.world_size()
    cfg = preset(a.preset)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=a.batch_per_rank * world))
    state = to_device(init_model(cfg, torch.Generator().manual_seed(0)), device)
    stream = data.iterate_batches(data.load_corpus(), cfg.train.batch_size, cfg.train.context, 0)
    step = D.step_function(a.exchange)
    for _ in range(a.warmup):
        state, _ = step(state, next(stream).to(device), cfg)
    batch = [next(stream).to(device) for _ in range(a.steps)]

    def run_steps() -> None:
        nonlocal state
        for b in batch:
            state, m = step(state, b, cfg)
        float(m["loss"])

    seconds = _timed(run_steps, device, 1)
    grads, _, aux = gradient_signals(state, D.shard(batch[0], D.rank(), world), cfg.train)
    votes = sum(w.num_weights for w in weights(state.params) if w.trainable)
    flat = torch.randn(votes, device=device)
    ex = {name: _timed(lambda n=name: D.exchange_votes(grads, n), device, a.reps) for name in D.EXCHANGES}
    ex["fp32"] = _timed(lambda: dist.all_reduce(flat), device, a.reps)
    evidence = sum(v.numel() for v in aux.values() if v.dim())
    scalars = 1 + sum(1 for v in aux.values() if not v.dim())
    wire = {name: D.wire_bytes(world, votes, name, evidence, scalars) for name in (*D.EXCHANGES, "fp32")}
    if D.rank() == 0:
        Path(a.result).write_text(json.dumps({
            "world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": cfg.train.batch_size, "context": cfg.train.context, "votes": votes, "evidence": evidence,
            "steps_per_s": a.steps / seconds, "bytes_per_s": a.steps * cfg.train.batch_size * cfg.train.context / seconds,
            "exchange_ms": {k: 1e3 * v for k, v in ex.items()}, "wire": wire}))
    D.shutdown()


def table(rows: list[dict], exchange: str) -> str:
    """Markdown table of the per-world-size results."""
    base = next((r["bytes_per_s"] for r in rows if r["world"] == 1), None)
    out = ["| world | device | global batch | steps/s | bytes/s | speedup vs 1 rank | trits MB/step | int8 MB/step "
           "| fp32 all-reduce MB/step | fp32 / trits | evidence MB/step | trits ms | int8 ms | fp32 all-reduce ms |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w, ms = r["wire"], r["exchange_ms"]
        ratio = f"{w['fp32']['votes'] / w['trits']['votes']:.1f}×" if w["trits"]["votes"] else "–"
        speed = f"{r['bytes_per_s'] / base:.2f}×" if base else "–"
        out.append(f"| {r['world']} | {r['device']} | {r['batch']}×{r['context']} | {r['steps_per_s']:.2f} "
                   f"| {r['bytes_per_s']:,.0f} | {speed} | {w['trits']['votes'] / MB:.3f} | {w['int8']['votes'] / MB:.3f} "
                   f"| {w['fp32']['votes'] / MB:.3f} | {ratio} | {w[exchange]['evidence'] / MB:.4f} "
                   f"| {ms['trits']:.2f} | {ms['int8']:.2f} | {ms['fp32']:.2f} |")
    return "\n".join(out)


def main() -> None:
    """Parse arguments; as a rank, measure; otherwise launch each world size and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each exchange")
    p.add_argument("--batch-per-rank", type=int, default=16)
    p.add_argument("--exchange", default="trits", choices=D.EXCHANGES, help="the exchange the timed steps use")
    p.add_argument("--device", default="auto")
    p.add_argument("--result", help="(set for the ranks) where rank 0 writes its JSON")
    a = p.parse_args()
    if D.launched():
        worker(a)
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in a.world_sizes.split(",")):
            result = Path(tmp, f"w{world}.json")
            argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("result", "world_sizes")]
            rc = D.relaunch("benchmarks.distributed", [*argv, f"--result={result}"], world)
            if rc:
                sys.exit(f"world size {world}: the ranks failed (exit {rc})")
            rows.append(json.loads(result.read_text()))
    r0 = rows[0]
    print(f"{a.preset} preset: L = {r0['votes']:,} votes per step, E = {r0['evidence']:,} evidence ids per rank; "
          f"timed steps use the {a.exchange} exchange; {a.steps} steps after {a.warmup} warm-up; "
          f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']} OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(table(rows, a.exchange))


if __name__ == "__main__":
    main()
