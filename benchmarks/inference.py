"""Inference latency of one forward: eager against ``torch.compile`` (fixed-step loops) and against the
AOTInductor package of :func:`arbfn.export.export_model`, same state and ids, in one run.

The package is loaded and timed in a child process, so a loader crash (seen on torch 2.11 + CUDA for
every AOTInductor package) is reported as such instead of ending the benchmark.

    python -m benchmarks.inference [--device cuda] [--preset small] [--batch 1] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from arbfn.config import preset
from arbfn.export import export_model, load_compiled
from arbfn.model import forward, init_model
from arbfn.ternary import to_device
from benchmarks._timing import describe, format_table, median_ms, sync_ms


def time_package(path: str, device: str) -> None:
    """Child-process entry: load the package, check it against nothing but itself, print its median ms as JSON."""
    model = load_compiled(path)
    ids = torch.randint(0, 256, (model.batch_size, model.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    out = model(ids)
    print(json.dumps({"ms": median_ms(lambda: model(ids), torch.device(device)), "finite": bool(out.isfinite().all())}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--time-package", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time_package:
        return time_package(args.time_package, args.device)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    state = init_model(cfg, torch.Generator().manual_seed(0))
    state = type(state)(to_device(state.params, device), state.step.to(device), state.config)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    with torch.no_grad():
        eager = sync_ms(lambda: forward(state, ids).logits, device)
        compiled_fn = torch.compile(lambda s, i: forward(s, i, fixed_loops=True).logits, fullgraph=True)
        ref = forward(state, ids, fixed_loops=True).logits
        diff = float((compiled_fn(state, ids) - ref).abs().max())
        comp = median_ms(lambda: compiled_fn(state, ids), device)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        graphed_fn = torch.compile(lambda s, i: forward(s, i, fixed_loops=True).logits, fullgraph=True, mode=mode)
        graphed_fn(state, ids)
        gdiff = float((graphed_fn(state, ids) - ref).abs().max())
        graphed = median_ms(lambda: graphed_fn(state, ids), device)
    rows.append(["eager (early-exit loops)", eager, 1.0, "-"])
    rows.append(["torch.compile fullgraph (fixed loops)", comp, eager / comp, f"{diff:.2e}"])
    rows.append([f"torch.compile mode={mode}", graphed, eager / graphed, f"{gdiff:.2e}"])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(state, args.batch, args.seq, Path(tmp) / "model.pt2")
        child = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--device", args.device,
                                "--time-package", str(path)], capture_output=True, text=True)
    if child.returncode == 0:
        got = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(["AOTInductor package", got["ms"], eager / got["ms"], f"finite={got['finite']}"])
    else:
        rows.append(["AOTInductor package", f"failed (exit {child.returncode})", "-", child.stderr.strip()[-120:]])
    print(f"device: {describe(device)}; preset {args.preset}; ids [{args.batch}, {args.seq}]; forward only")
    print(format_table(["path", "ms", "speed-up vs eager", "max |diff| vs eager fixed"], rows))


if __name__ == "__main__":
    main()
