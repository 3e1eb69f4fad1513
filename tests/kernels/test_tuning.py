"""Every config an autotuned kernel may pick computes the same result (tests/kernels check the default one
over many shapes; this runs each tuning config directly, so whatever a GPU's tuner chooses is covered)."""

from __future__ import annotations

import pytest
import torch
import triton

from kernels import gemv_lut, update
from kernels._triton import _FirstConfig, cdiv
from kernels.embedding import _embedding_fwd_kernel, embedding_fwd_reference
from kernels.linear import _decode_kernel, _linear_gemv_kernel, gemv_slots, gemv_splits
from kernels.packing import decode_reference, n_groups, pack_reference, packed_width

SHAPES = [(7, 133, 32), (33, 2563, 6), (5, 1030, 96)]  # (rows, columns, group size): ragged edges everywhere
GEMV_SHAPES = [(7, 133, 32), (33, 611, 6), (5, 1030, 96)]  # the GEMV interprets slowly: fewer groups


def weight(n: int, k: int, gs: int, g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    e = torch.randint(-12, 6, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    return p.to(device), e.to(device)


def each_config(kernel, monkeypatch):
    """Every tuning config of ``kernel``, each set in turn as the one its launches take: untuned runs only (the
    interpreter, or ARBFN_AUTOTUNE=0); under the tuner the test is skipped, since the tuner picks the config."""
    if not hasattr(kernel, "config"):
        pytest.skip("the tuner picks the config here: run with ARBFN_AUTOTUNE=0 to test each one")
    for config in kernel.configs:
        monkeypatch.setattr(kernel, "config", config)
        yield config


def launch(kernel, config, grid, *args, **kwargs) -> None:
    """One launch of ``kernel``'s plain function with ``config``'s meta-parameters and launch options."""
    kernel.fn[grid(config.kwargs)](*args, **kwargs, **config.all_kwargs())


def test_untuned_launch_keeps_the_first_configs_launch_options():
    """ARBFN_AUTOTUNE=0 and the interpreter run the first config as the tuner would: warps, stages and the
    register cap included, not only its meta-parameters."""
    seen = {}

    class Kernel:
        def __getitem__(self, grid):
            seen["grid"] = grid
            return lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs)

    config = triton.Config({"BLOCK": 64}, num_warps=2, num_stages=1, maxnreg=96)
    _FirstConfig(Kernel(), [config, triton.Config({"BLOCK": 128}, num_warps=8)])[lambda m: (m["BLOCK"],)](7, K=3)
    assert seen["grid"] == (64,) and seen["args"] == (7,)
    assert seen["kwargs"].items() >= {"K": 3, "BLOCK": 64, "num_warps": 2, "num_stages": 1, "maxnreg": 96}.items()


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_every_decode_config_is_exact(kernel_device, n, k, gs):
    g = torch.Generator().manual_seed(k)
    p, e = weight(n, k, gs, g, kernel_device)
    ref = decode_reference(p.cpu(), e.cpu(), k, gs)
    for config in _decode_kernel.configs:
        w = torch.full((n, k), float("nan"), device=kernel_device)
        launch(_decode_kernel, config, lambda m: (cdiv(n, m["BLOCK_N"]), cdiv(k, 8 * m["BLOCK_T"])),
               p, e, w, n, k, packed_width(k), n_groups(k, gs), GS=gs)
        assert torch.equal(w.cpu(), ref), config


def gemv_case(n: int, k: int, gs: int, seed: int, device: str, m: int = 1):
    """A random weight on ``device``, ``m`` input rows, and the float64 product with its magnitude |x| @ |W|.T."""
    g = torch.Generator().manual_seed(seed)
    p, e = weight(n, k, gs, g, device)
    x = torch.randn((m, k), generator=g)
    w = decode_reference(p.cpu(), e.cpu(), k, gs).double()
    return p, e, x, x.double() @ w.T, x.double().abs() @ w.abs().T


def assert_partials_match(part: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, config) -> None:
    """The K-split partials [1, splits, N] sum to the float64 product (fp32 error, relative to |x| @ |W|.T)."""
    y = part.sum(1).cpu().double()
    assert float((y - ref).norm() / mag.norm()) < 1e-5, config


@pytest.mark.parametrize("n,k,gs", GEMV_SHAPES)
def test_every_gemv_config_matches_reference(kernel_device, n, k, gs):
    p, e, x, ref, mag = gemv_case(n, k, gs, k + 1, kernel_device)
    groups = n_groups(k, gs)
    split = gemv_splits(n, groups, gs)
    for config in _linear_gemv_kernel.configs:
        part = torch.full((1, split, n), float("nan"), device=kernel_device)
        launch(_linear_gemv_kernel, config, lambda m: (cdiv(n, m["BLOCK_N"]), split, 1), x.to(kernel_device), part,
               p, e, n, k, packed_width(k), groups, cdiv(groups, split), GS=gs, SLOTS=gemv_slots(gs))
        assert_partials_match(part, ref, mag, config)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,gs", [(7, 133, 32), (33, 611, 6), (300, 130, 16)])
def test_every_table_gemv_config_matches_reference(kernel_device, monkeypatch, m, n, k, gs):
    """The table GEMV at every tile config, through its own launch (two K splits, fp32 entries)."""
    p, e, x, ref, mag = gemv_case(n, k, gs, k + 3, kernel_device, m)
    for config in each_config(gemv_lut._gemv_kernel, monkeypatch):
        y = gemv_lut.gemv_lut(x.to(kernel_device), p, e, k, gs, 2).cpu().double()
        assert float((y - ref).norm() / mag.norm()) < 1e-5, config.all_kwargs()


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_every_embedding_config_is_exact(kernel_device, n, k, gs):
    g = torch.Generator().manual_seed(k + 2)
    p, e = weight(n, k, gs, g, kernel_device)
    ids = torch.randint(0, n, (37,), generator=g).to(kernel_device)
    ref = embedding_fwd_reference(ids.cpu(), p.cpu(), e.cpu(), k, gs)
    for config in _embedding_fwd_kernel.configs:
        out = torch.full((37, k), float("nan"), device=kernel_device)
        launch(_embedding_fwd_kernel, config, lambda m: (cdiv(37, m["BLOCK_R"]), cdiv(k, 8 * m["BLOCK_T"])),
               ids, p, e, out, 37, k, packed_width(k), n_groups(k, gs), GS=gs)
        assert torch.equal(out.cpu(), ref), config


@pytest.mark.parametrize("mode", ["counter", "nibble", "stochastic"])
@pytest.mark.parametrize("n,k", [(7, 133), (3, 1031)])
def test_every_flip_config_matches_reference(kernel_device, mode, n, k):
    """The flip kernel's trits, counters and flip count at every tile config, in each of its three modes."""
    g = torch.Generator().manual_seed(k + 3)
    gs, th = 32, 3
    packed = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    grad = torch.randn((n, k), generator=g).masked_fill(torch.rand((n, k), generator=g) < 0.1, 0.0)
    exp = e_acc = torch.zeros((n, n_groups(k, gs)), dtype=torch.int8)  # the exponent rule is not under test here
    counters = torch.randint(1 - th, th, (n, k), generator=g, dtype=torch.int8)
    step = torch.tensor(5, dtype=torch.int64)
    if mode == "stochastic":
        cutoff = update.flip_cutoff(step, th)
        ref_packed, _, _, ref_flips, _ = update.ternary_update_stochastic_reference(
            packed, exp, e_acc, grad, step, cutoff, k, gs, 1, 7)
        t_acc, ref_t, stream = None, None, (step.to(kernel_device), cutoff.to(kernel_device), 7)
    else:
        t_acc = update.pack_nibbles(counters) if mode == "nibble" else counters
        ref_packed, _, ref_t, _, ref_flips, _ = update.ternary_update_reference(
            packed, exp, t_acc, e_acc, grad, k, gs, th, 1, counter_bits=4 if mode == "nibble" else 8)
        t_acc, stream = t_acc.to(kernel_device), None
    kb, qb = packed_width(k), cdiv(packed_width(k), 2)
    kt = t_acc.shape[1] if t_acc is not None else k
    step_arg, cut_arg, seed_hi, seed_lo = update._stream_args(stream)
    for config in update._flip_kernel.configs:
        new_packed = torch.full_like(packed, 255, device=kernel_device)
        new_t = None if t_acc is None else torch.full_like(t_acc, 99)
        counts = torch.zeros(cdiv(n * qb, config.kwargs["BLOCK_S"]), dtype=torch.int32, device=kernel_device)
        launch(update._flip_kernel, config, lambda m: (cdiv(n * qb, m["BLOCK_S"]),), packed.to(kernel_device), t_acc,
               grad.to(kernel_device), step_arg, cut_arg, new_packed, new_t, counts, n * qb, k, kb, kt, qb, th, seed_hi,
               seed_lo, STOCHASTIC=mode == "stochastic", NIBBLES=mode == "nibble")
        assert torch.equal(new_packed.cpu(), ref_packed), config
        assert new_t is None or torch.equal(new_t.cpu(), ref_t), config
        assert int(counts.sum()) == int(ref_flips), config


@pytest.mark.parametrize("mode", ["counter", "stochastic", "nibble"])
@pytest.mark.parametrize("n,k,gs", [(3, 1283, 32), (5, 333, 8), (2, 2051, 64)])
def test_every_fused_update_config_matches_reference(kernel_device, monkeypatch, mode, n, k, gs):
    """The fused update (both rules, atomic byte deltas) at every tile config, through the op's own launch."""
    g = torch.Generator().manual_seed(k + 5)
    th, the = 3, 2
    packed = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    grad = torch.randn((n, k), generator=g).masked_fill(torch.rand((n, k), generator=g) < 0.1, 0.0)
    exp = torch.randint(-5, 5, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    e_acc = torch.randint(-1, 2, exp.shape, generator=g, dtype=torch.int8)
    counters = torch.randint(1 - th, th, (n, k), generator=g, dtype=torch.int8)
    step = torch.tensor(5, dtype=torch.int64)
    dev = {"packed": packed.to(kernel_device), "exp": exp.to(kernel_device), "e_accum": e_acc.to(kernel_device),
           "grad": grad.to(kernel_device)}
    bits = 4 if mode == "nibble" else 8
    t_acc = update.pack_nibbles(counters) if bits == 4 else counters
    if mode == "stochastic":
        cutoff = update.flip_cutoff(step, th)
        ref = update.ternary_update_stochastic_reference(packed, exp, e_acc, grad, step, cutoff, k, gs, the, 7)
    else:
        ref = update.ternary_update_reference(packed, exp, t_acc, e_acc, grad, k, gs, th, the, counter_bits=bits)
    for config in each_config(update._fused_kernel, monkeypatch):
        if mode == "stochastic":
            out = update.ternary_update_stochastic_triton(**dev, step=step.to(kernel_device),
                                                          cutoff=cutoff.to(kernel_device), k=k, group_size=gs,
                                                          exp_threshold=the, seed=7)
        else:
            out = update.ternary_update_triton(**dev, t_accum=t_acc.to(kernel_device), k=k, group_size=gs,
                                               flip_threshold=th, exp_threshold=the, counter_bits=bits)
        for got, want in zip(out, ref):
            assert torch.equal(got.cpu(), want), config.all_kwargs()


def test_the_fused_update_restores_its_packed_output_between_timed_runs():
    """The tuner times each config on the real arguments before the real launch; the fused update adds each flip
    into a copy of the old bytes, so every timed run would add its flips again (Triton issues 4217 and 6547) unless
    the tuner restores that copy after each run."""
    assert update._fused_kernel.protected == {"reset_to_zero": ["count_ptr", "exp_count_ptr"],
                                              "restore_value": ["new_packed_ptr"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuner runs only on a GPU")
def test_a_tuned_first_launch_of_the_fused_update_equals_the_reference():
    """A shape the tuner has not seen (so this launch times every config first) still gives the reference's
    bytes, counters and counts, with int8 counters and with stochastic flips."""
    g = torch.Generator().manual_seed(0)
    n, k, gs = 96 + int(torch.randint(0, 4096, (1,), generator=g)), 1000, 32  # a fresh tuning key per run
    packed = pack_reference(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    exp = torch.randint(-12, 6, (n, n_groups(k, gs)), generator=g, dtype=torch.int8)
    e_accum = torch.randint(-3, 4, exp.shape, generator=g, dtype=torch.int8)
    grad = torch.randn((n, k), generator=g)
    t_accum = torch.randint(-2, 3, (n, k), generator=g, dtype=torch.int8)
    step, cutoff = torch.tensor(3), torch.tensor(1 << 22)
    cuda = [x.cuda() for x in (packed, exp, t_accum, e_accum, grad)]
    want = update.ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, gs, 2, 3)
    got = update.ternary_update_triton(*cuda, k, gs, 2, 3)
    assert all(torch.equal(w, x.cpu()) for w, x in zip(want, got))
    want = update.ternary_update_stochastic_reference(packed, exp, e_accum, grad, step, cutoff, k, gs, 3, 7)
    got = update.ternary_update_stochastic_triton(cuda[0], cuda[1], cuda[3], cuda[4], step.cuda(), cutoff.cuda(), k,
                                                  gs, 3, 7)
    assert all(torch.equal(w, x.cpu()) for w, x in zip(want, got))
