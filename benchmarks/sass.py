"""Instruction counts without a GPU: compile the hot Triton kernels for sm_90 on this machine (Triton's bundled
``ptxas`` and ``cuobjdump``) and count their SASS per element, the figure that bounds an issue-bound kernel.

    python -m benchmarks.sass [--kernels decode,gemv,embedding,flip,exponent] [--arch 90]

A launch specialises integer arguments divisible by 16 (unless the kernel opts out with ``do_not_specialize``);
the compile here assumes that for every pointer and the row stride, as the benchmarks' shapes give. A kernel
without a loop counts its whole SASS; the GEMVs count their main loop's body. ``SHFL`` counts lane exchanges
(a sign of a layout split across lanes); ``MEMBAR`` counts memory fences (an atomic's default ``acq_rel`` order puts
a GPU-wide one before each atomic: RESULTS.md). The counts are static: they predict time only where ``ncu`` shows a
kernel bound by instruction issue (RESULTS.md). ``regs`` (registers per thread) bounds occupancy, the other
limit a lean kernel meets; it comes from this Triton's ``ptxas``, which may differ from the GPU machine's
(a kernel here at 125 registers took 189 with triton 3.6's).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("benchmarks.sass compiles kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks._timing import format_table  # noqa: E402
from kernels import embedding, gemv_lut, linear, update, update_chain  # noqa: E402
from kernels.linear import gemv_slots  # noqa: E402

_LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


@dataclass
class Case:
    """One kernel at one config: what to compile and how many elements each thread handles."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    divisible: tuple[int, ...]
    num_warps: int
    per_thread: float
    unit: str
    loop: bool = False


def jit_function(case: Case) -> triton.runtime.JITFunction:
    """The case's kernel, under its autotuner if it has one."""
    return case.fn if isinstance(case.fn, triton.runtime.JITFunction) else case.fn.fn


def check_signature(case: Case) -> None:
    """Raise ValueError unless the case names exactly the kernel's arguments, in order (a kernel whose
    arguments changed must not be compiled against a stale signature)."""
    names = [*case.signature, *case.constexprs]
    if names != jit_function(case).arg_names:
        raise ValueError(f"{case.name}: the signature lists {names}, the kernel takes {jit_function(case).arg_names}")


def compile_cubin(case: Case, arch: int) -> bytes:
    """The kernel compiled for ``sm_<arch>`` (a cubin)."""
    check_signature(case)
    signature = {**case.signature, **{k: "constexpr" for k in case.constexprs}}
    fn = jit_function(case)
    fixed = {fn.arg_names.index(a) if isinstance(a, str) else a for a in fn.do_not_specialize}  # a launch never
    attrs = {(i,): [["tt.divisibility", 16]] for i in case.divisible if i not in fixed}  # specialises these
    src = ASTSource(fn, signature=signature, constexprs=case.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps}).asm["cubin"]


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Triton's bundled ``cuobjdump <flag>`` of a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread (``REG``, which bounds occupancy) and spill stack bytes (``STACK``) of a cubin."""
    usage = cuobjdump(cubin, "-res-usage")
    return {key: int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK")}


def instructions(sass: str, loop: bool) -> list[tuple[int, str]]:
    """(address, opcode) of every instruction, or of the longest backward branch's body with ``loop``."""
    found = [(int(m.group(1), 16), m.group(2).split(".")[0]) for m in map(_LINE.match, sass.splitlines()) if m]
    if not loop:
        return found
    body: list[tuple[int, str]] = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        target = re.search(r"BRA\s+.*?0x([0-9a-f]+)", line)
        if m and target and int(target.group(1), 16) < int(m.group(1), 16):
            lo, hi = int(target.group(1), 16), int(m.group(1), 16)
            inside = [(a, op) for a, op in found if lo <= a <= hi]
            body = inside if len(inside) > len(body) else body
    return body


def cases() -> list[Case]:
    """The hot kernels at the configs the tuner picked on the H200 (RESULTS.md)."""
    stream = {"step_ptr": "*i64", "cut_ptr": "*i64"}
    flip = {"packed_ptr": "*u8", "t_accum_ptr": "*i8", "grad_ptr": "*fp32", **stream, "new_packed_ptr": "*u8",
            "new_t_accum_ptr": "*i8", "count_ptr": "*i32", "NQ": "i32", "K": "i32", "KB": "i32", "KT": "i32",
            "QB": "i32", "TH": "i32", "SEED_HI": "i32", "SEED_LO": "i32"}
    exp = {"packed_ptr": "*u8", "exp_ptr": "*i8", "e_accum_ptr": "*i8", "grad_ptr": "*fp32", "new_exp_ptr": "*i8",
           "new_e_accum_ptr": "*i8", "count_ptr": "*i32", "NG": "i32", "K": "i32", "KB": "i32", "G": "i32",
           "THE": "i32"}
    gs = 32
    chunk_groups, chunk_bytes = gemv_lut.chunk_shape(gs)
    lookups = sum((q * gs + gs - 1) // 5 - q * gs // 5 + 1 for q in range(chunk_groups))  # per lane and chunk
    out = [
        Case("decode", linear._decode_kernel, {"packed_ptr": "*u8", "exp_ptr": "*i8", "w_ptr": "*bf16", "N": "i32",
                                               "K": "i32", "KB": "i32", "G": "i32"},
             {"GS": gs, "BLOCK_N": 1, "BLOCK_T": 256}, (0, 1, 2, 4), 4, 256 * 8 / 128, "output"),
        Case("embedding", embedding._embedding_fwd_kernel,
             {"ids_ptr": "*i64", "packed_ptr": "*u8", "exp_ptr": "*i8", "out_ptr": "*fp32", "R": "i32", "D": "i32",
              "KB": "i32", "G": "i32"}, {"GS": gs, "BLOCK_R": 4, "BLOCK_T": 128}, (0, 1, 2, 3, 5), 4,
             4 * 128 * 8 / 128, "output"),
        Case("gemv", linear._linear_gemv_kernel,
             {"x_ptr": "*bf16", "out_ptr": "*fp32", "packed_ptr": "*u8", "exp_ptr": "*i8", "N": "i32", "K": "i32",
              "KB": "i32", "G": "i32", "SPLIT_G": "i32"},
             {"GS": gs, "SLOTS": gemv_slots(gs), "BLOCK_N": 64, "BLOCK_G": 2, "FLOAT_DIGITS": 2}, (0, 1, 2, 3, 5), 4,
             64 * 2 * gemv_slots(gs) / 128, "(row, byte slot)", loop=True),
        Case("gemv_lut", gemv_lut._gemv_kernel,
             {"table_ptr": "*fp16", "scale_ptr": "*fp32", "out_ptr": "*fp32", "packed_ptr": "*u8", "exp_ptr": "*i8",
              "N": "i32", "K": "i32", "KB": "i32", "G": "i32", "SPLIT_C": "i32", "BASE_P": "i32", "BASE_E": "i32",
              "WORDS_P": "i32", "WORDS_E": "i32"},
             {"GS": gs, "SL": gemv_lut.slots(gs), "CH_G": chunk_groups, "CH_B": chunk_bytes, "M": 1, "BLOCK_N": 256},
             (0, 1, 2, 3, 4), 8, lookups, "(row, byte slot)", loop=True),
    ]
    for mode in ("counter", "stochastic", "nibble"):
        out.append(Case(f"flip ({mode})", update._flip_kernel, flip,
                        {"BLOCK_S": 128, "STOCHASTIC": mode == "stochastic", "NIBBLES": mode == "nibble"},
                        tuple(range(8)) + (9,), 4, 128 * 10 / 128, "weight"))
    fused = {"packed_ptr": "*u8", "t_accum_ptr": "*i8", "grad_ptr": "*fp32", **stream, "exp_ptr": "*i8",
             "e_accum_ptr": "*i8", "new_packed_ptr": "*u8", "new_t_accum_ptr": "*i8", "new_exp_ptr": "*i8",
             "new_e_accum_ptr": "*i8", "count_ptr": "*i32", "exp_count_ptr": "*i32", "N": "i32", "K": "i32",
             "KB": "i32", "KT": "i32", "G": "i32", "TH": "i32", "THE": "i32", "SEED_HI": "i32", "SEED_LO": "i32"}
    for mode in ("counter", "stochastic", "nibble"):  # the whole update in one kernel (group sizes 8-64), at the
        for warps in (4, 2):  # H100 tuner's picks: 4 warps for int8 counters, 2 (two octets a thread) for the others
            out.append(Case(f"fused update ({mode}, {warps} warps)", update._fused_kernel, fused,
                            {"GS": gs, "BLOCK_R": 1, "BLOCK_O": 128, "STOCHASTIC": mode == "stochastic",
                             "NIBBLES": mode == "nibble"}, tuple(range(13)) + (14,), warps, 128 * 8 / (32 * warps),
                            "weight"))
    chain = {"packed_ptr": "*u8", "places_ptr": "*u8", "grad_ptr": "*fp32", **stream, "new_packed_ptr": "*u8",
             "new_places_ptr": "*u8", "count_ptr": "*i32", "N": "i32", "K": "i32", "KB": "i32", "KP": "i32", "G": "i32",
             "scale": "fp32", "power": "fp32", "SEED_HI": "i32", "SEED_LO": "i32"}
    for warps in (4, 2):  # the chain kernel tunes over the fused update's configs
        out.append(Case(f"chain update ({warps} warps)", update_chain._chain_kernel, chain,
                        {"GS": gs, "BLOCK_R": 1, "BLOCK_O": 128}, (0, 1, 2, 3, 4, 5, 6, 7, 9), warps,
                        128 * 8 / (32 * warps), "weight"))
    out.append(Case("exponent", update._exp_update_kernel, exp, {"GS": gs, "GS_P2": gs, "BLOCK_Q": 128},
                    (0, 1, 2, 3, 4, 5, 6, 8), 4, 128 * gs / 128, "weight"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="", help="comma-separated name prefixes (default: all)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100/H200)")
    args = ap.parse_args(argv)
    wanted = [w for w in args.kernels.split(",") if w]
    chosen = [case for case in cases() if not wanted or any(case.name.startswith(w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"--kernels {args.kernels!r} matches none of: {', '.join(c.name for c in cases())}")
    rows = []
    for case in chosen:
        cubin = compile_cubin(case, args.arch)
        ops = collections.Counter(op for _, op in instructions(cuobjdump(cubin, "-sass"), case.loop))
        total = sum(ops.values())
        top = " ".join(f"{op} {n}" for op, n in ops.most_common(6))
        use = resources(cubin)
        rows.append([case.name, case.unit, round(total / case.per_thread, 1), ops["SHFL"], ops["LDG"], ops["MEMBAR"],
                     use["REG"], use["STACK"], top])
    print(f"SASS for sm_{args.arch}, triton {triton.__version__}, group size 32")
    print(format_table(["kernel", "per", "SASS per element", "SHFL", "LDG", "MEMBAR", "regs", "spill B", "most frequent"],
                       rows))


if __name__ == "__main__":
    main()
