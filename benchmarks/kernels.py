"""Kernel throughput against the baseline a user would otherwise pick, side by side in one run.

Ternary linear (``arbfn::linear_fwd``) against bf16 ``x @ W.T`` (cuBLAS) and a naive torch
unpack-then-matmul, at M = 1 (decode GEMV) and larger M; memory-bound ops (embedding gather, RMSNorm,
update, MoE combine, gather-residual, denoise step) as achieved bandwidth over the bytes each must move,
against the measured device-to-device copy bandwidth.

    python -m benchmarks.kernels [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

import kernels  # noqa: F401  (registers the ops)
import kernels.linear as ops_linear
from benchmarks._timing import copy_bandwidth_gbs, describe, format_table, graph_ms, median_ms, rotating
from kernels import gemv_lut
from kernels._triton import cdiv
from kernels.packing import decode_reference, n_groups, pack, packed_width
from kernels.update import flip_cutoff
from kernels.update_chain import places_width, ternary_update_chain_triton

GROUP_SIZE = 32


def random_weight(n: int, k: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed trits [n, ceil(k/5)] and int8 exponents [n, G] near the init scale."""
    trits = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8).to(device)
    exp = torch.randint(-8, -4, (n, n_groups(k, GROUP_SIZE)), generator=gen, dtype=torch.int8).to(device)
    return pack(trits), exp


L2_BYTES = 50 * 2**20  # H100/H200 L2; weight copies rotate past twice this


def copies_past_l2(nbytes: int) -> int:
    """How many copies of an ``nbytes`` weight make a rotation that cannot live in L2 (at most 8)."""
    return max(1, min(8, -(-2 * L2_BYTES // nbytes)))


def tuned(kernel) -> str:
    """The config the autotuner picked at its last launch ("-" where none ran: CPU, or ARBFN_AUTOTUNE=0)."""
    best = getattr(kernel, "best_config", None)
    return "-" if best is None else " ".join(f"{k}={v}" for k, v in best.all_kwargs().items())


def linear_rows(device: torch.device, shapes: list[tuple[int, int]], ms: list[int], copy_gbs: float) -> list[list]:
    """One row per (shape, M): ternary (the op's dispatch) vs bf16 cuBLAS vs naive unpack-then-matmul, and both
    ternary paths apart (the packed-byte GEMV where the op takes it, up to GEMV_MAX_M rows: the table GEMV at
    group size 32; the Triton decode + one matmul), each replayed from a CUDA graph with its weights rotated past L2; the tuned config of
    the path the op took."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        weights = [random_weight(n, k, device, gen) for _ in range(copies_past_l2(n * packed_width(k)))]
        dense = [(decode_reference(p, e, k, GROUP_SIZE).to(torch.bfloat16),)
                 for p, e in weights[:copies_past_l2(2 * n * k)]]
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            on_gpu = device.type == "cuda"
            gemv = (graph_ms(rotating(lambda p, e: ops_linear._gemv(x, p, e, k, GROUP_SIZE), weights), device)
                    if on_gpu and m <= ops_linear.GEMV_MAX_M else float("nan"))
            via_decode = (graph_ms(rotating(lambda p, e: x @ ops_linear.decode_triton(p, e, k, GROUP_SIZE, x.dtype).T,
                                            weights), device) if on_gpu else float("nan"))
            ternary = graph_ms(rotating(lambda p, e: torch.ops.arbfn.linear_fwd(x, p, e, k, GROUP_SIZE), weights), device)
            bf16 = graph_ms(rotating(lambda w: x @ w.T, dense), device)
            # the naive path builds index tensors on the host each call, which a CUDA graph cannot capture
            naive = median_ms(rotating(lambda p, e: x @ decode_reference(p, e, k, GROUP_SIZE, torch.bfloat16).T,
                                       weights), device)
            moved = n * packed_width(k) + n * n_groups(k, GROUP_SIZE) + 2 * (x.numel() + m * n)
            gemv_kernel = gemv_lut._gemv_kernel if gemv_lut.fits(GROUP_SIZE) else ops_linear._linear_gemv_kernel
            path = gemv_kernel if m <= ops_linear.GEMV_MAX_M else ops_linear._decode_kernel
            rows.append([f"{n}x{k}", m, ternary, gemv, via_decode, bf16, naive, bf16 / ternary,
                         moved / ternary / 1e6, moved / ternary / 1e6 / copy_gbs, 2 * m * n * k / ternary / 1e9,
                         tuned(path)])
    return rows


def bandwidth_rows(device: torch.device, copy_gbs: float, scale: int) -> list[list]:
    """Memory-bound ops: time, bytes they must move (each input read once, each output written once), GB/s.
    Each op is replayed from a CUDA graph: a custom op's host dispatch (tens of microseconds) would otherwise
    be what a sub-0.1 ms kernel's figure measures."""
    gen = torch.Generator().manual_seed(1)
    ops = torch.ops.arbfn
    rows: list[list] = []

    def add(name: str, fn: Callable[[], object], nbytes: int) -> None:
        ms = graph_ms(fn, device)
        rows.append([name, ms, nbytes / 1e6, nbytes / ms / 1e6, nbytes / ms / 1e6 / copy_gbs])

    dn, dk = 4096 * scale, 4096
    dp, de = random_weight(dn, dk, device, gen)
    decode = ops_linear.decode_triton if device.type == "cuda" else decode_reference
    add(f"decode {dn}x{dk} -> bf16", lambda: decode(dp, de, dk, GROUP_SIZE, torch.bfloat16),
        dp.numel() + de.numel() + 2 * dn * dk)
    v, d, t = 8192 * scale, 1024, 4096 * scale
    packed, exp = random_weight(v, d, device, gen)
    ids = torch.randint(0, v, (t,), generator=gen).to(device)
    add(f"embedding_fwd {t} of {v}x{d}", lambda: ops.embedding_fwd(ids, packed, exp, d, GROUP_SIZE),
        t * (packed_width(d) + n_groups(d, GROUP_SIZE) + 8 + 4 * d))
    x = torch.randn(t, d, generator=gen).to(device)
    gp, ge = random_weight(1, d, device, gen)
    add(f"rmsnorm_fwd {t}x{d} fp32", lambda: ops.rmsnorm_fwd(x, gp, ge, 1e-6, GROUP_SIZE), 2 * x.numel() * 4)
    gx = torch.randn(t, d, generator=gen).to(device)
    add(f"rmsnorm_bwd {t}x{d} fp32", lambda: ops.rmsnorm_bwd(gx, x, gp, ge, 1e-6, GROUP_SIZE), 3 * x.numel() * 4)
    xh, rh, gh = (a.to(torch.bfloat16) for a in (x, torch.randn(t, d, generator=gen).to(device), gx))
    add(f"add_rmsnorm_fwd {t}x{d} bf16", lambda: ops.add_rmsnorm_fwd(xh, rh, gp, ge, 1e-6, GROUP_SIZE),
        4 * xh.numel() * 2)  # x, r in; h, y out
    add(f"add_rmsnorm_bwd {t}x{d} bf16", lambda: ops.add_rmsnorm_bwd(gh, rh, xh, gp, ge, 1e-6, GROUP_SIZE),
        4 * xh.numel() * 2)  # gy, gh, h in; dh out (the partials are under 1 MB)
    n, k = 4096, 4096 * scale
    up, ue = random_weight(n, k, device, gen)
    t_acc = torch.zeros(n, k, dtype=torch.int8, device=device)
    e_acc = torch.zeros_like(ue)
    grad = torch.randn(n, k, generator=gen).to(device)
    upd_bytes = 2 * (up.numel() + t_acc.numel() + 2 * ue.numel()) + grad.numel() * 4
    add(f"ternary_update {n}x{k}", lambda: ops.ternary_update(up, ue, t_acc, e_acc, grad, k, GROUP_SIZE, 8, 32), upd_bytes)
    nib = torch.zeros(n, cdiv(k, 2), dtype=torch.uint8, device=device)
    add(f"ternary_update_nibble {n}x{k}",
        lambda: ops.ternary_update_nibble(up, ue, nib, e_acc, grad, k, GROUP_SIZE, 7, 32),
        2 * (up.numel() + nib.numel() + 2 * ue.numel()) + grad.numel() * 4)
    step = torch.tensor(3, device=device)
    cutoff = flip_cutoff(step, 16)
    add(f"ternary_update_stochastic {n}x{k}",
        lambda: ops.ternary_update_stochastic(up, ue, e_acc, grad, step, cutoff, k, GROUP_SIZE, 32, 0),
        2 * (up.numel() + 2 * ue.numel()) + grad.numel() * 4)
    places = torch.zeros(n, places_width(k), dtype=torch.int16, device=device)
    chain_bytes = 2 * (up.numel() + places.numel() * 2) + grad.numel() * 4  # no exponent moves
    add(f"ternary_update_chain {n}x{k} (the op: reference)",
        lambda: ops.ternary_update_chain(up, places, grad, step, cutoff, k, GROUP_SIZE, 2.0, 3.0, 0), chain_bytes)
    if device.type == "cuda":  # the kernel, not yet the op's CUDA dispatch (kernels/update_chain.py)
        add(f"ternary_update_chain {n}x{k} (Triton)",
            lambda: ternary_update_chain_triton(up, places, grad, step, cutoff, k, GROUP_SIZE, 2.0, 3.0, 0),
            chain_bytes)
    e_, n_, d_ = 8, 2048 * scale, 512
    expert_out = torch.randn(e_, n_, d_, generator=gen).to(device)
    weights = torch.rand(n_, e_, generator=gen).to(device)
    add(f"route_combine {e_}x{n_}x{d_}", lambda: ops.route_combine(expert_out, weights),
        (expert_out.numel() + weights.numel() + n_ * d_) * 4)
    nodes = torch.randn(8192, d_, generator=gen).to(device)
    idx = torch.randint(0, 8192, (n_,), generator=gen).to(device)
    xr = torch.randn(n_, d_, generator=gen).to(device)
    add(f"gather_residual {n_}x{d_}", lambda: ops.gather_residual(xr, nodes, idx), (3 * n_ * d_) * 4 + n_ * 8)
    lat = torch.randn(64 * scale, 16, 1, 32, 32, generator=gen).to(device)
    pred = torch.randn_like(lat)
    alpha = torch.rand(lat.shape[0], generator=gen).to(device) * 0.9 + 0.05
    add(f"denoise_fwd {tuple(lat.shape)}", lambda: ops.denoise_fwd(lat, pred, alpha), 3 * lat.numel() * 4)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke of the script itself)")
    ap.add_argument("--table", choices=["all", "linear", "bandwidth"], default="all",
                    help="print only the linear table or only the memory-bound table (saves device time)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu"
    shapes = [(256, 256)] if quick else [(4096, 4096), (8192, 8192), (14336, 4096)]
    ms = [1, 16] if quick else [1, 2, 4, 16, 256, 4096]
    copy_gbs = copy_bandwidth_gbs(device, 1 << 24 if quick else 1 << 30)
    print(f"device: {describe(device)}; measured copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    if args.table in ("all", "linear"):
        print(format_table(["W (NxK)", "M", "ternary ms", "GEMV ms", "decode+mm ms", "bf16 ms", "naive ms",
                            "bf16/ternary", "GB/s", "of copy", "TFLOP/s", "tuned"],
                           linear_rows(device, shapes, ms, copy_gbs)))
        print()
    if args.table in ("all", "bandwidth"):
        print(format_table(["op", "ms", "MB moved", "GB/s", "of copy"],
                           bandwidth_rows(device, copy_gbs, 1 if quick else 8)))


if __name__ == "__main__":
    main()
