"""benchmarks.sass compiles real kernels for sm_90 on a CPU machine and counts their instructions."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tool compiles, never interprets
    return subprocess.run([sys.executable, "-m", "benchmarks.sass", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def table(stdout: str) -> dict[str, dict[str, str]]:
    """The tool's table as {kernel: {column: cell}}: benchmarks._timing.format_table joins cells with two spaces,
    and no header or cell holds two spaces in a row."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kernel"))
    header = re.split(r"\s{2,}", lines[start].strip())
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 2:] if line.strip()]
    return {row[0]: dict(zip(header, row)) for row in cells}


def test_counts_the_decode_kernels_instructions():
    proc = run_tool("--kernels", "decode")
    assert proc.returncode == 0, proc.stderr
    row = table(proc.stdout)["decode"]
    per_output, regs, spill = float(row["SASS per element"]), int(row["regs"]), int(row["spill B"])
    assert 4 < per_output < 100  # a few float ops per trit at least; far below a per-element loop
    assert 0 < regs <= 255 and spill == 0  # registers per thread from the cubin; the decode does not spill
    assert "flip" not in proc.stdout  # --kernels selects


def test_every_case_names_its_kernels_arguments():
    """Each case's signature and constexprs are its kernel's arguments in order (checked without compiling)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from benchmarks.sass import cases, check_signature\nfor c in cases():\n    check_signature(c)\nprint(len(cases()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 10


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "without TRITON_INTERPRET" in proc.stderr


def test_a_filter_that_matches_nothing_names_the_kernels():
    proc = run_tool("--kernels", "update")
    assert proc.returncode != 0 and "matches none of" in proc.stderr and "fused update (counter, 4 warps)" in proc.stderr


def test_the_fused_updates_byte_adds_compile_without_fences():
    """The update's atomic byte adds commute and are read after the kernel: ``sem="relaxed"`` keeps them plain
    reductions. The default ``acq_rel`` compiles each to a GPU-wide ``MEMBAR`` (4 per kernel), which cost the
    counter-free update 17% on an H100 (RESULTS.md); a fence here is that regression."""
    proc = run_tool("--kernels", "fused update")
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert len(rows) == 6  # counter, stochastic, nibble, each at 4 and 2 warps
    for row in rows.values():
        assert row["per"] == "weight" and float(row["SASS per element"]) > 0
        assert row["MEMBAR"] == "0", proc.stdout
