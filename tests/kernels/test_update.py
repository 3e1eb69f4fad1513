"""Properties of ``arbfn::ternary_update``, ``arbfn::ternary_update_nibble`` and ``arbfn::ternary_update_stochastic``:
Triton == reference == a plain-Python restatement of the rule, output invariants, repeated-call behaviour, the
4-bit counters' layout and their equality with the 8-bit rule, the hashed flip rate, argument validation, and
torch.compile; and of ``arbfn::ternary_update_group``: each weight of a list updated as the single-weight ops do."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.packing import n_groups, pack_reference, unpack_reference, validate_packed
from kernels.update import (draws, flip_cutoff, pack_nibbles, step_key, stream_seed, ternary_update,
                            ternary_update_nibble, ternary_update_reference, ternary_update_stochastic,
                            ternary_update_stochastic_reference, ternary_update_stochastic_triton,
                            ternary_update_triton, unpack_nibbles)
from kernels.update_group import (FLAT_ALIGN, flat_offsets, ternary_update_group, ternary_update_group_triton,
                                  unflatten)

GROUP_SIZES = (4, 6, 8, 16, 32, 64, 96)
SPECIAL_K = (1, 2, 3, 4, 5, 6, 7, 11, 13, 31, 40, 48, 60, 61, 64, 67, 70)
SPECIAL_GRADS = (0.0, -0.0, math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, -1e-45)
THRESHOLDS = st.one_of(st.sampled_from((1, 2, 127)), st.integers(1, 127))


def make_case(n: int, k: int, gs: int, th: int, the: int, acc_mode: str, exp_mode: str, grad_mode: str, seed: int):
    """Inputs of one update: (packed, exp, t_accum, e_accum, grad) on CPU, grad fp32."""
    gen = torch.Generator().manual_seed(seed)
    g = n_groups(k, gs)

    def randint(lo: int, hi: int, shape) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=gen)

    def pick(values, shape) -> torch.Tensor:
        values = torch.tensor(values)
        return values[randint(0, len(values) - 1, shape)]

    def accum(shape, bound: int) -> torch.Tensor:
        if acc_mode == "uniform":
            return randint(-bound, bound, shape).to(torch.int8)
        return pick((-bound, -bound + 1, 0, bound - 1, bound), shape).to(torch.int8)

    packed = pack_reference(randint(-1, 1, (n, k)).to(torch.int8))
    exp = (randint(-128, 127, (n, g)) if exp_mode == "uniform" else pick((-128, -127, 0, 126, 127), (n, g))).to(torch.int8)
    grad = torch.randn((n, k), generator=gen) * pick((1e-30, 1e-3, 1.0, 1e30), (n, k))
    special = torch.rand((n, k), generator=gen) < (0.6 if grad_mode == "special" else 0.15)
    grad = torch.where(special, pick(SPECIAL_GRADS, (n, k)).to(torch.float32), grad)
    return packed, exp, accum((n, k), th), accum((n, g), the), grad


@st.composite
def cases(draw, max_n: int = 9, max_k: int = 70):
    """(inputs, k, group_size, flip_threshold, exp_threshold)."""
    n = draw(st.integers(1, max_n))
    k = draw(st.one_of(st.sampled_from([x for x in SPECIAL_K if x <= max_k]), st.integers(1, max_k)))
    gs, th, the = draw(st.sampled_from(GROUP_SIZES)), draw(THRESHOLDS), draw(THRESHOLDS)
    modes = [draw(st.sampled_from(m)) for m in (("uniform", "edge"), ("uniform", "edge"), ("mixed", "special"))]
    inputs = make_case(n, k, gs, th, the, *modes, seed=draw(st.integers(0, 2**31 - 1)))
    return inputs, k, gs, th, the


COUNTER_OUTPUTS = ("packed", "exp", "t_accum", "e_accum", "flips", "exp_moves")
STOCHASTIC_OUTPUTS = ("packed", "exp", "e_accum", "flips", "exp_moves")


def assert_same(got, want, names: tuple[str, ...] = COUNTER_OUTPUTS) -> None:
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs:\n{a}\n{b}"


# ---------------------------------------------------------------- 1. Triton == reference


@given(cases())
def test_triton_matches_reference(kernel_device, case):
    inputs, *ints = case
    want = ternary_update_reference(*inputs, *ints)
    dev_inputs = [x.to(kernel_device) for x in inputs]
    got = ternary_update_triton(*dev_inputs, *ints)
    assert_same(got, want)
    for before, after in zip(inputs, dev_inputs):  # pure: inputs untouched
        assert torch.equal(before, after.cpu()) or (before.is_floating_point() and
                                                     torch.equal(before.isnan(), after.cpu().isnan()))


@given(cases(max_n=4), st.integers(0, 2**31 - 1))
def test_padding_digits_of_any_value_come_out_as_zero_trits(kernel_device, case, salt):
    """Each row's last byte set to any value 0..242, padding digits (columns k .. 5 KB - 1) included: every flip
    mode equals the reference, which reads only the k columns, and writes the padding as zero trits (the
    other tests' inputs come from ``pack_reference``, whose padding is already zero)."""
    (packed, exp, t_accum, e_accum, grad), k, gs, th, the = case
    gen = torch.Generator().manual_seed(salt)
    packed = packed.clone()
    packed[:, -1] = torch.randint(0, 243, (packed.shape[0],), generator=gen).to(torch.uint8)

    def dev(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(kernel_device) for x in xs]

    want = ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, gs, th, the)
    assert_same(ternary_update_triton(*dev(packed, exp, t_accum, e_accum, grad), k, gs, th, the), want)
    nib = pack_nibbles(t_accum.clamp(-8, 7))
    want = ternary_update_reference(packed, exp, nib, e_accum, grad, k, gs, min(th, 7), the, counter_bits=4)
    assert_same(ternary_update_triton(*dev(packed, exp, nib, e_accum, grad), k, gs, min(th, 7), the, counter_bits=4),
                want)
    step, cutoff = torch.tensor(salt), torch.tensor(1 << 23)
    want = ternary_update_stochastic_reference(packed, exp, e_accum, grad, step, cutoff, k, gs, the, salt)
    got = ternary_update_stochastic_triton(*dev(packed, exp, e_accum, grad, step, cutoff), k, gs, the, salt)
    assert_same(got, want, STOCHASTIC_OUTPUTS)
    validate_packed(got[0].cpu(), k)


@given(cases(max_n=4, max_k=40), st.sampled_from((torch.float16, torch.bfloat16)))
def test_half_grads_vote_like_fp32(kernel_device, case, dtype):
    """A half-precision grad votes exactly as its (exact) fp32 upcast, on both implementations."""
    (packed, exp, ta, ea, grad), *ints = case
    half = grad.to(dtype)
    want = ternary_update_reference(packed, exp, ta, ea, half.to(torch.float32), *ints)
    assert_same(ternary_update_reference(packed, exp, ta, ea, half, *ints), want)
    dev = [x.to(kernel_device) for x in (packed, exp, ta, ea, half)]
    assert_same(ternary_update_triton(*dev, *ints), want)


# ---------------------------------------------------------------- 2. reference == plain-Python restatement


def rule_by_loops(packed, exp, t_accum, e_accum, grad, k, gs, th, the):
    """The update rule restated element by element in plain Python (independent of kernels.*)."""
    P, E, TA, EA, GR = (x.tolist() for x in (packed, exp, t_accum, e_accum, grad))
    kb, g = -(-k // 5), -(-k // gs)
    out_p, out_e, out_ta, out_ea, flips, moves = [], [], [], [], 0, 0
    for r in range(len(P)):
        old = [(P[r][c // 5] // 3 ** (c % 5)) % 3 - 1 for c in range(k)]
        sign = [1 if x > 0 else (-1 if x < 0 else 0) for x in GR[r]]  # NaN compares False both ways
        new, accs = [], []
        for c in range(k):
            a, t = max(-th, min(th, TA[r][c] - sign[c])), old[c]
            if a >= th and t < 1:
                t, a = t + 1, 0
            elif a <= -th and t > -1:
                t, a = t - 1, 0
            flips += t != old[c]
            new.append(t)
            accs.append(a)
        digits = [t + 1 for t in new] + [1] * (5 * kb - k)
        out_p.append([sum(digits[5 * b + i] * 3**i for i in range(5)) for b in range(kb)])
        out_ta.append(accs)
        es, bs = [], []
        for j in range(g):
            score = sum(sign[c] * old[c] for c in range(j * gs, min(k, (j + 1) * gs)))
            e, b = E[r][j], max(-the, min(the, EA[r][j] - (score > 0) + (score < 0)))
            if b >= the and e < 127:
                e, b = e + 1, b - the
            elif b <= -the and e > -128:
                e, b = e - 1, b + the
            moves += e != E[r][j]
            es.append(e)
            bs.append(b)
        out_e.append(es)
        out_ea.append(bs)
    n = len(P)
    return (torch.tensor(out_p, dtype=torch.uint8).reshape(n, kb), torch.tensor(out_e, dtype=torch.int8).reshape(n, g),
            torch.tensor(out_ta, dtype=torch.int8).reshape(n, k), torch.tensor(out_ea, dtype=torch.int8).reshape(n, g),
            torch.tensor(flips, dtype=torch.int64), torch.tensor(moves, dtype=torch.int64))


@given(cases(max_n=4, max_k=40))
def test_reference_matches_plain_python(case):
    inputs, *ints = case
    assert_same(ternary_update_reference(*inputs, *ints), rule_by_loops(*inputs, *ints))


# ---------------------------------------------------------------- 3. invariants


@given(cases())
def test_outputs_are_valid_and_steps_are_small(kernel_device, case):
    (packed, exp, ta, ea, grad), k, gs, th, the = case
    dev = [x.to(kernel_device) for x in (packed, exp, ta, ea, grad)]
    new_p, new_e, new_ta, new_ea, flips, moves = (x.cpu() for x in ternary_update(*dev, k, gs, th, the))
    validate_packed(new_p, k)  # bytes <= 242, width, padding digits all 1 (zero trits)
    if k % 5:
        assert torch.all(new_p[:, -1].to(torch.int32) // 3 ** (k % 5) == 121 // 3 ** (k % 5))
    old_t, new_t = unpack_reference(packed, k).to(torch.int32), unpack_reference(new_p, k).to(torch.int32)
    assert torch.all((new_t - old_t).abs() <= 1)
    assert torch.all((new_e.to(torch.int32) - exp.to(torch.int32)).abs() <= 1)
    assert torch.all(new_ta.abs() <= th) and torch.all(new_ea.abs() <= the)
    assert torch.all(new_ta[new_t != old_t] == 0)
    assert flips.item() == int((new_t != old_t).sum()) and moves.item() == int((new_e != exp).sum())
    assert flips.shape == () and moves.shape == () and flips.dtype == moves.dtype == torch.int64


@given(cases(), st.sampled_from((0.0, math.nan)))
def test_zero_or_nan_grad_changes_nothing(kernel_device, case, fill):
    """On any state an update can produce (and on accumulators strictly inside), a silent grad is a no-op."""
    inputs, k, gs, th, the = case
    dev = [x.to(kernel_device) for x in inputs]
    state = list(ternary_update(*dev, k, gs, th, the)[:4])
    silent = torch.full_like(dev[4], fill)
    inner = [dev[0], dev[1], dev[2].clamp(-th + 1, th - 1), dev[3].clamp(-the + 1, the - 1)]
    for s in (state, inner):
        out = ternary_update(*s, silent, k, gs, th, the)
        assert_same(out, (*s, torch.tensor(0), torch.tensor(0)))


def repeat(state, grad, times: int, k: int, gs: int, th: int, the: int):
    """Apply the update ``times`` times with the same grad; returns (state, total flips, total moves)."""
    flips = moves = 0
    for _ in range(times):
        *state, f, m = ternary_update(*state, grad, k, gs, th, the)
        flips, moves = flips + f.item(), moves + m.item()
    return state, flips, moves


@given(cases(), st.one_of(st.integers(1, 24), st.just(127)), st.floats(1e-30, 1e30))
def test_constant_negative_grad_flips_every_trit_up_after_theta_steps(kernel_device, case, th, mag):
    (packed, exp, _, _, _), k, gs, _, the = case
    n, dev = packed.shape[0], kernel_device
    state = [packed.to(dev), exp.to(dev), torch.zeros((n, k), dtype=torch.int8, device=dev),
             torch.zeros((n, n_groups(k, gs)), dtype=torch.int8, device=dev)]
    grad = torch.full((n, k), -mag, device=dev)
    old = unpack_reference(packed, k)
    before, flips, _ = repeat(state, grad, th - 1, k, gs, th, the)
    assert flips == 0 and torch.equal(before[0].cpu(), packed)
    after, flips, _ = repeat(before, grad, 1, k, gs, th, the)
    assert torch.equal(unpack_reference(after[0].cpu(), k), (old + 1).clamp(max=1))
    assert flips == int((old < 1).sum())
    assert torch.all(after[2].cpu() == torch.where(old < 1, 0, th))


@given(cases(), st.sampled_from((-1, 1)), st.sampled_from((-1, 1)), st.one_of(st.integers(1, 24), st.just(127)),
       st.floats(1e-30, 1e30))
def test_uniform_trits_move_exponent_once_after_theta_e_steps(kernel_device, case, trit, sign, the, mag):
    """All trits = ``trit`` and grad = ``sign * mag``: E moves by -trit*sign after exactly θE steps (saturating)."""
    (_, exp, _, _, _), k, gs, _, _ = case
    n, g, dev = exp.shape[0], exp.shape[1], kernel_device
    packed = pack_reference(torch.full((n, k), trit, dtype=torch.int8))
    state = [packed.to(dev), exp.to(dev), torch.zeros((n, k), dtype=torch.int8, device=dev),
             torch.zeros((n, g), dtype=torch.int8, device=dev)]
    grad, th = torch.full((n, k), sign * mag, device=dev), 127  # θ >= θE: trits hold until E has moved
    before, _, moves = repeat(state, grad, the - 1, k, gs, th, the)
    assert moves == 0 and torch.equal(before[1].cpu(), exp)
    after, _, moves = repeat(before, grad, 1, k, gs, th, the)
    want = (exp.to(torch.int32) - trit * sign).clamp(-128, 127)
    assert torch.equal(after[1].cpu(), want.to(torch.int8))
    assert moves == int((want != exp).sum())
    saturated = want == exp
    assert torch.all(after[3].cpu() == torch.where(saturated, -trit * sign * the, 0))


def test_empty_rows(kernel_device):
    inputs = [x.to(kernel_device) for x in make_case(0, 7, 4, 3, 3, "uniform", "uniform", "mixed", seed=0)]
    for impl in (ternary_update, ternary_update_triton, ternary_update_reference):
        out = impl(*inputs, 7, 4, 3, 3)
        assert [tuple(x.shape) for x in out] == [(0, 2), (0, 2), (0, 7), (0, 2), (), ()]
        assert out[4].item() == 0 and out[5].item() == 0


# ---------------------------------------------------------------- 4. validation


def _small():
    return make_case(3, 13, 4, 5, 5, "uniform", "uniform", "mixed", seed=1), 13, 4, 5, 5


def _bad_cases():
    (p, e, ta, ea, gr), k, gs, th, the = _small()
    ok = dict(packed=p, exp=e, t_accum=ta, e_accum=ea, grad=gr, k=k, group_size=gs, flip_threshold=th,
              exp_threshold=the)
    bad = {
        "flip_threshold=0": dict(flip_threshold=0), "flip_threshold=128": dict(flip_threshold=128),
        "exp_threshold=0": dict(exp_threshold=0), "exp_threshold=128": dict(exp_threshold=128),
        "group_size=3": dict(group_size=3), "group_size=97": dict(group_size=97),
        "k=0": dict(k=0, packed=p[:, :0], exp=e[:, :0], t_accum=ta[:, :0], e_accum=ea[:, :0], grad=gr[:, :0]),
        "k too big": dict(k=14), "packed width": dict(packed=p[:, :2]), "packed 1-D": dict(packed=p[0]),
        "exp groups": dict(exp=e[:, :3]), "exp rows": dict(exp=e[:2]), "exp dtype": dict(exp=e.to(torch.uint8)),
        "t_accum cols": dict(t_accum=ta[:, :12]), "t_accum dtype": dict(t_accum=ta.to(torch.int32)),
        "e_accum shape": dict(e_accum=ea[:, :1]), "grad shape": dict(grad=gr[:, :12]),
        "grad int": dict(grad=gr.nan_to_num().to(torch.int32)), "packed dtype": dict(packed=p.to(torch.int8)),
    }
    impls = (ternary_update, ternary_update_reference, ternary_update_triton)
    return [pytest.param(impls, {**ok, **change}, id=name) for name, change in bad.items()]


def _bad_stochastic_cases():
    (p, e, _, ea, gr), k, gs, th, the = _small()
    ok = dict(packed=p, exp=e, e_accum=ea, grad=gr, step=torch.tensor(3), cutoff=flip_cutoff(torch.tensor(3), th),
              k=k, group_size=gs, exp_threshold=the, seed=0)
    bad = {
        "exp_threshold=128": dict(exp_threshold=128),
        "group_size=3": dict(group_size=3), "k too big": dict(k=14), "packed width": dict(packed=p[:, :2]),
        "e_accum shape": dict(e_accum=ea[:, :1]), "grad int": dict(grad=gr.nan_to_num().to(torch.int32)),
        "step int32": dict(step=torch.tensor(3, dtype=torch.int32)), "step 1-D": dict(step=torch.tensor([3])),
        "cutoff int32": dict(cutoff=torch.tensor(5, dtype=torch.int32)), "cutoff 1-D": dict(cutoff=torch.tensor([5])),
        "seed<0": dict(seed=-1), "seed>=2**32": dict(seed=2**32),
    }
    impls = (ternary_update_stochastic, ternary_update_stochastic_reference, ternary_update_stochastic_triton)
    return [pytest.param(impls, {**ok, **change}, id=f"stochastic {name}") for name, change in bad.items()]


@pytest.mark.parametrize("args", [(0,), (2**24 + 1,), (64, 2**24 + 1, 5), (64, 128, 0), (64, 128, -1), (64, 0, 5)],
                         ids=["θ=0", "θ=2**24+1", "θ1=2**24+1", "θ1 without steps", "steps<0", "steps without θ1"])
def test_bad_flip_schedules_raise(args):
    with pytest.raises(ValueError):
        flip_cutoff(torch.tensor(0), *args)


NIBBLE_IMPLS = (ternary_update_nibble, functools.partial(ternary_update_reference, counter_bits=4),
                functools.partial(ternary_update_triton, counter_bits=4))


def _nibble_args() -> dict:
    """Valid keyword arguments of the nibble op: k = 13, so 7 counter bytes per row."""
    (p, e, ta, ea, gr), k, gs, _, the = _small()
    return dict(packed=p, exp=e, t_accum=pack_nibbles(ta.clamp(-7, 7)), e_accum=ea, grad=gr, k=k, group_size=gs,
                flip_threshold=7, exp_threshold=the)


def _bad_nibble_cases():
    ok = _nibble_args()
    nib, ta = ok["t_accum"], unpack_nibbles(ok["t_accum"], ok["k"])
    bad = {
        "flip_threshold=8": dict(flip_threshold=8), "flip_threshold=0": dict(flip_threshold=0),
        "int8 counters": dict(t_accum=ta), "int8 half width": dict(t_accum=nib.to(torch.int8)),
        "uint8 full width": dict(t_accum=ta.to(torch.uint8)), "one byte short": dict(t_accum=nib[:, :6]),
        "rows": dict(t_accum=nib[:2]), "exp_threshold=128": dict(exp_threshold=128), "k too big": dict(k=14),
    }
    return [pytest.param(NIBBLE_IMPLS, {**ok, **change}, id=f"nibble {name}") for name, change in bad.items()]


@pytest.mark.parametrize("impls,args", _bad_cases() + _bad_stochastic_cases() + _bad_nibble_cases())
def test_bad_arguments_raise_value_error(kernel_device, impls, args):
    """Every implementation of the op (``impls[0]`` is the op itself) and its fake raise ValueError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dev = {name: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    for impl in impls:
        with pytest.raises(ValueError):
            impl(**dev)
    with FakeTensorMode() as mode, pytest.raises(ValueError):  # the fake (what torch.compile traces) checks too
        impls[0](**{n: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in args.items()})


@pytest.mark.parametrize("bits", (0, 5, 16))
def test_counter_bits_other_than_8_or_4_raise(kernel_device, bits):
    args = {n: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for n, v in _nibble_args().items()}
    for impl in (ternary_update_reference, ternary_update_triton):
        with pytest.raises(ValueError, match="counter_bits must be one of"):
            impl(**args, counter_bits=bits)


@pytest.mark.parametrize("op,bits", [(ternary_update, 8), (ternary_update_nibble, 4)])
def test_good_arguments_pass_the_fake(op, bits):
    from torch._subclasses.fake_tensor import FakeTensorMode

    (packed, exp, ta, ea, grad), k, gs, _, the = _small()
    inputs = (packed, exp, ta if bits == 8 else pack_nibbles(ta.clamp(-7, 7)), ea, grad)
    want = ternary_update_reference(*inputs, k, gs, 5, the, counter_bits=bits)
    with FakeTensorMode() as mode:
        out = op(*(mode.from_tensor(x) for x in inputs), k, gs, 5, the)
        assert [(x.shape, x.dtype, x.stride()) for x in out] == [(x.shape, x.dtype, x.stride()) for x in want]


# ---------------------------------------------------------------- 5. torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("op_name", ["ternary_update", "ternary_update_nibble"])
def test_compiled_matches_eager(op_name):
    """Two chained updates compiled fullgraph equal eager, for int8 and 4-bit counters; opcheck on both ops."""
    k, gs, th, the = 37, 6, 2, 1
    packed, exp, t_accum, e_accum, grad = make_case(5, k, gs, th, the, "edge", "edge", "mixed", seed=3)
    inputs = (packed, exp, pack_nibbles(t_accum) if op_name.endswith("nibble") else t_accum, e_accum, grad)
    op = getattr(torch.ops.arbfn, op_name)

    def two_steps(packed, exp, t_accum, e_accum, grad):
        *state, f1, m1 = op(packed, exp, t_accum, e_accum, grad, k, gs, th, the)
        *state, f2, m2 = op(*state, -grad, k, gs, th, the)
        return (*state, f1 + f2, m1 + m2)

    torch._dynamo.reset()
    want = two_steps(*inputs)
    assert want[4].item() > 0 and want[5].item() > 0  # the example exercises both rules
    assert_same(torch.compile(two_steps, fullgraph=True)(*inputs), want)
    torch.library.opcheck(op.default, (*inputs, k, gs, th, the))


# ---------------------------------------------------------------- 6. stochastic flips (no t_accum)

EXTREME_STEPS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63))
EXTREME_SEEDS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)


EXTREME_CUTOFFS = (-(2**63), -1, 0, 1, 2**24 - 1, 2**24, 2**24 + 1, 2**40)


@st.composite
def stochastic_cases(draw, max_n: int = 9, max_k: int = 70):
    """(inputs without t_accum, plus step and cutoff, k, group_size, exp_threshold, seed): the cutoff of a
    threshold θ (that of the counter case), an annealed one at the case's step, or any int64."""
    (packed, exp, _, e_accum, grad), k, gs, th, the = draw(cases(max_n, max_k))
    step = torch.tensor(draw(st.one_of(st.sampled_from(EXTREME_STEPS), st.integers(-(2**63), 2**63 - 1))))
    seed = draw(st.one_of(st.sampled_from(EXTREME_SEEDS), st.integers(0, 2**32 - 1)))
    cutoff = draw(st.one_of(
        st.just(flip_cutoff(step, th)),
        st.builds(lambda th1, t: flip_cutoff(step, th, th1, t), st.integers(1, 2**24), st.integers(1, 2**40)),
        st.sampled_from(EXTREME_CUTOFFS).map(torch.tensor)))
    return (packed, exp, e_accum, grad, step, cutoff), k, gs, the, seed


@given(stochastic_cases())
def test_stochastic_triton_matches_reference(kernel_device, case):
    inputs, *ints = case
    want = ternary_update_stochastic_reference(*inputs, *ints)
    got = ternary_update_stochastic_triton(*(x.to(kernel_device) for x in inputs), *ints)
    assert_same(got, want, STOCHASTIC_OUTPUTS)


def _mix32(x: int) -> int:
    """lowbias32 restated on Python ints with explicit modular arithmetic."""
    x ^= x >> 16
    x = x * 0x21F0AAAD % 2**32
    x ^= x >> 15
    x = x * 0x735A2D97 % 2**32
    return x ^ (x >> 15)


def stochastic_rule_by_loops(packed, exp, e_accum, grad, step, cutoff, k, gs, the, seed):
    """The stochastic flip restated element by element (the exponent part is the counter op's, tested above)."""
    P, GR, cut = packed.tolist(), grad.tolist(), int(cutoff)
    key = _mix32((int(step) % 2**32 * 0x61C88647 + seed) % 2**32)
    kb, flips, out_p = -(-k // 5), 0, []
    for r in range(len(P)):
        new = []
        for c in range(k):
            t = (P[r][c // 5] // 3 ** (c % 5)) % 3 - 1
            vote = -1 if GR[r][c] > 0 else (1 if GR[r][c] < 0 else 0)
            u = _mix32(((r * k + c) * 0x61C88647 + key) % 2**32) >> 8
            if u < cut and vote and -1 <= t + vote <= 1:
                t, flips = t + vote, flips + 1
            new.append(t)
        digits = [t + 1 for t in new] + [1] * (5 * kb - k)
        out_p.append([sum(digits[5 * b + i] * 3**i for i in range(5)) for b in range(kb)])
    return torch.tensor(out_p, dtype=torch.uint8).reshape(len(P), kb), torch.tensor(flips, dtype=torch.int64)


@given(stochastic_cases(max_n=4, max_k=40))
def test_stochastic_reference_matches_plain_python(case):
    inputs, k, gs, the, seed = case
    packed, exp, e_accum, grad, _, _ = inputs
    got = ternary_update_stochastic_reference(*inputs, k, gs, the, seed)
    want_p, want_flips = stochastic_rule_by_loops(*inputs, k, gs, the, seed)
    assert torch.equal(got[0], want_p) and torch.equal(got[3], want_flips)
    counter = ternary_update_reference(packed, exp, torch.zeros(grad.shape, dtype=torch.int8), e_accum, grad, k, gs,
                                       1, the)
    for mine, theirs in ((got[1], counter[1]), (got[2], counter[3]), (got[4], counter[5])):  # the same exponent rule
        assert torch.equal(mine, theirs)


@given(stochastic_cases(max_n=4, max_k=40))
def test_stochastic_threshold_one_is_counter_threshold_one(kernel_device, case):
    """With θ = 1 (cutoff 2**24) every vote moves its trit, as the counter rule with θ = 1 does."""
    (packed, exp, e_accum, grad, step, _), k, gs, the, seed = case
    dev = [x.to(kernel_device) for x in (packed, exp, e_accum, grad, step, flip_cutoff(step, 1))]
    got = ternary_update_stochastic(*dev, k, gs, the, seed)
    ta = torch.zeros(grad.shape, dtype=torch.int8, device=kernel_device)
    p, e, _, ea, flips, moves = ternary_update(dev[0], dev[1], ta, dev[2], dev[3], k, gs, 1, the)
    assert_same(got, (p, e, ea, flips, moves), STOCHASTIC_OUTPUTS)


@given(stochastic_cases(), st.sampled_from((0.0, math.nan)))
def test_stochastic_moves_only_along_votes(kernel_device, case, fill):
    """Trits move by at most one step, only in their vote's direction; a silent grad changes nothing."""
    (packed, exp, e_accum, grad, step, cutoff), k, gs, the, seed = case
    dev = [x.to(kernel_device) for x in (packed, exp, e_accum, grad, step, cutoff)]
    new_p, _, _, flips, _ = (x.cpu() for x in ternary_update_stochastic(*dev, k, gs, the, seed))
    validate_packed(new_p, k)
    delta = unpack_reference(new_p, k).to(torch.int32) - unpack_reference(packed, k).to(torch.int32)
    vote = (grad < 0).to(torch.int32) - (grad > 0).to(torch.int32)
    assert torch.all((delta == 0) | (delta == vote)) and flips.item() == int((delta != 0).sum())
    inner = dev[2].clamp(-the + 1, the - 1)  # an accumulator at ±θE moves its exponent even without a vote
    silent = ternary_update_stochastic(dev[0], dev[1], inner, torch.full_like(dev[3], fill), dev[4], dev[5], k, gs,
                                       the, seed)
    assert_same(silent, (dev[0], dev[1], inner, torch.tensor(0), torch.tensor(0)), STOCHASTIC_OUTPUTS)


def _moved_fraction(kernel_device, step: int, cutoff: torch.Tensor) -> tuple[int, int]:
    """(trits moved, weights) when 64 x 500 zero trits all vote up at ``step`` under ``cutoff``."""
    n, k, gs = 64, 500, 32
    packed = pack_reference(torch.zeros((n, k), dtype=torch.int8)).to(kernel_device)
    exp = torch.zeros((n, n_groups(k, gs)), dtype=torch.int8, device=kernel_device)
    grad = torch.full((n, k), -1.0, device=kernel_device)
    out = ternary_update_stochastic(packed, exp, exp.clone(), grad, torch.tensor(step, device=kernel_device),
                                    cutoff.to(kernel_device), k, gs, 127, 12345)
    assert torch.all(unpack_reference(out[0].cpu(), k) >= 0)
    return out[3].item(), n * k


@pytest.mark.parametrize("th", (1, 2, 7, 64, 127, 1000))
@pytest.mark.parametrize("step", (0, 2**32 - 1, 2**63 - 1))
def test_stochastic_flip_rate_is_one_over_theta(kernel_device, th, step):
    """All-zero trits under one vote direction: the moved fraction is floor(2**24/θ)/2**24 within 5 sigma."""
    p = int(flip_cutoff(torch.tensor(step), th)) / 2**24
    moved, n = _moved_fraction(kernel_device, step, flip_cutoff(torch.tensor(step), th))
    assert abs(moved - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def _unmix32(h: int) -> int:
    """The inverse of :func:`_mix32` (xorshifts and odd multiplications are bijections mod 2**32)."""

    def unshift(y: int, s: int) -> int:
        x = y
        for _ in range(32 // s):
            x = y ^ (x >> s)
        return x

    h = unshift(h, 15) * pow(0x735A2D97, -1, 2**32) % 2**32
    return unshift(unshift(h, 15) * pow(0x21F0AAAD, -1, 2**32) % 2**32, 16)


@pytest.mark.parametrize("th", (3, 7, 127))
def test_stochastic_cutoff_is_exact(kernel_device, th):
    """A seed chosen so that weight [0, 0] at step 0 draws exactly u: it moves iff u < floor(2**24 / θ)."""
    cut = 2**24 // th
    for u in (cut - 1, cut):
        h = u << 8 | 0xA5
        seed = _unmix32(_unmix32(h))  # step_key(0, seed) = mix32(seed); the draw of weight 0 = mix32(key) >> 8
        assert _mix32(_mix32(seed)) == h and int(draws(step_key(torch.tensor(0), seed), 1, 1)) == u
        packed, exp = pack_reference(torch.zeros((1, 1), dtype=torch.int8)), torch.zeros((1, 1), dtype=torch.int8)
        args = (packed, exp, exp.clone(), torch.full((1, 1), -1.0), torch.tensor(0), flip_cutoff(torch.tensor(0), th))
        for impl in (ternary_update_stochastic_reference, ternary_update_stochastic_triton):
            out = impl(*(x.to(kernel_device) for x in args), 1, 4, 127, seed)
            assert out[3].item() == int(u < cut), (impl.__name__, u, cut)


@pytest.mark.parametrize("th,th1,steps", ((4, 64, 100), (64, 2048, 1000), (200, 3, 7), (1, 2**24, 1)))
def test_flip_cutoff_anneals_geometrically(th, th1, steps):
    """The annealed cutoff starts at floor(2**24/θ), ends exactly at floor(2**24/θ1) from step T on, moves
    monotonically between, and follows θ (θ1/θ)**(step/T) (within the floor's one unit)."""
    cut = lambda step: int(flip_cutoff(torch.tensor(step), th, th1, steps))
    assert cut(-(2**63)) == cut(-1) == cut(0) == 2**24 // th
    assert cut(steps) == cut(steps + 1) == cut(2**63 - 1) == 2**24 // th1
    path = [cut(i) for i in range(steps + 1)]
    assert path == sorted(path, reverse=th1 > th)
    for i in range(steps):
        assert abs(path[i] - 2**24 / (th * (th1 / th) ** (i / steps))) <= 1
    assert int(flip_cutoff(torch.tensor(5), th)) == 2**24 // th  # no schedule: constant


@pytest.mark.parametrize("step,rate", ((0, 1 / 4), (50, 1 / 16), (100, 1 / 64), (10**6, 1 / 64)))
def test_annealed_flip_rate_follows_the_schedule(kernel_device, step, rate):
    """θ 4 -> 64 over 100 steps: all-zero trits under one vote move at 1/4, 1/16 (halfway), 1/64 (from the end)."""
    moved, n = _moved_fraction(kernel_device, step, flip_cutoff(torch.tensor(step), 4, 64, 100))
    assert abs(moved - n * rate) <= 5 * math.sqrt(n * rate * (1 - rate))


def test_draws_are_uniform_and_streams_differ():
    """24-bit draws fill 64 equal bins evenly (chi-square) at extreme keys; steps, seeds and tensors decorrelate."""
    n, k = 256, 256
    for step, seed in ((0, 0), (2**32 - 1, 2**32 - 1), (2**63 - 1, 1)):
        u = draws(step_key(torch.tensor(step), seed), n, k)
        assert int(u.min()) >= 0 and int(u.max()) < 2**24
        counts = torch.bincount((u >> 18).flatten(), minlength=64).double()
        chi2 = float(((counts - n * k / 64) ** 2 / (n * k / 64)).sum())
        assert chi2 < 63 + 6 * math.sqrt(2 * 63), chi2  # 63 degrees of freedom, ~6 sigma
    base = draws(step_key(torch.tensor(5), stream_seed(0, 0)), n, k) < 2**23
    for other in (draws(step_key(torch.tensor(6), stream_seed(0, 0)), n, k),
                  draws(step_key(torch.tensor(5), stream_seed(1, 0)), n, k),
                  draws(step_key(torch.tensor(5), stream_seed(0, 1)), n, k)):
        agree = float((base == (other < 2**23)).double().mean())
        assert abs(agree - 0.5) < 0.01, agree


def test_stream_seed_range_and_validation():
    assert all(0 <= stream_seed(s, i) < 2**32 for s in (0, 2**32 - 1, 2**40) for i in (0, 7, 2**33))
    assert len({stream_seed(0, i) for i in range(1000)}) == 1000
    for bad in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            stream_seed(*bad)


@pytest.mark.slow
def test_stochastic_compiled_matches_eager():
    k, gs, th, the, seed = 37, 6, 3, 1, 99
    packed, exp, _, e_accum, grad = make_case(5, k, gs, th, the, "edge", "edge", "mixed", seed=3)

    def two_steps(packed, exp, e_accum, grad, step):  # an annealed cutoff computed in the graph, once per step
        *state, f1, m1 = torch.ops.arbfn.ternary_update_stochastic(packed, exp, e_accum, grad, step,
                                                                    flip_cutoff(step, th, 40, 2**32 + 5), k, gs, the,
                                                                    seed)
        *state, f2, m2 = torch.ops.arbfn.ternary_update_stochastic(*state, -grad, step + 1,
                                                                    flip_cutoff(step + 1, th, 40, 2**32 + 5), k, gs,
                                                                    the, seed)
        return (*state, f1 + f2, m1 + m2)

    inputs = (packed, exp, e_accum, grad, torch.tensor(2**32 - 1))
    torch._dynamo.reset()
    want = two_steps(*inputs)
    assert want[3].item() > 0 and want[4].item() > 0  # the example exercises both rules
    assert_same(torch.compile(two_steps, fullgraph=True)(*inputs), want, STOCHASTIC_OUTPUTS)
    torch.library.opcheck(torch.ops.arbfn.ternary_update_stochastic.default,
                          (*inputs, flip_cutoff(inputs[4], th), k, gs, the, seed))


# ---------------------------------------------------------------- 7. 4-bit counters, two per byte


def nibbles_by_hand(counters: torch.Tensor) -> torch.Tensor:
    """int8 counters [N, k] in -8..7 as the documented layout, restated in plain Python (independent of kernels.*):
    byte j of a row = (c[2j] mod 16) + 16 * (c[2j+1] mod 16), a missing c[2j+1] (odd k) counting 0."""
    n, k = counters.shape
    rows = [r + [0] * (k % 2) for r in counters.tolist()]
    return torch.tensor([[r[2 * j] % 16 + 16 * (r[2 * j + 1] % 16) for j in range(len(r) // 2)] for r in rows],
                        dtype=torch.uint8).reshape(n, -(-k // 2))


def with_padding(nib: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """``nib`` with the padding nibble of every row (odd k only) set to ``pad``: garbage the ops must ignore."""
    if k % 2 == 0 or nib.shape[0] == 0:
        return nib
    out = nib.clone()
    out[:, -1] = (out[:, -1].to(torch.int32) & 15 | pad << 4).to(torch.uint8)
    return out


@st.composite
def nibble_cases(draw, max_n: int = 9, max_k: int = 70):
    """(inputs with int8 counters in -8..7, k, group_size, flip_threshold 1..7, exp_threshold, padding nibble)."""
    (packed, exp, _, e_accum, grad), k, gs, _, the = draw(cases(max_n, max_k))
    th = draw(st.integers(1, 7))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = packed.shape[0]
    if draw(st.booleans()):
        counters = torch.randint(-8, 8, (n, k), generator=gen)
    else:  # the extremes: both nibble limits and both sides of the threshold
        edges = torch.tensor((-8, -7, -th, 1 - th, 0, th - 1, th, 7))
        counters = edges[torch.randint(0, len(edges), (n, k), generator=gen)]
    return (packed, exp, counters.to(torch.int8), e_accum, grad), k, gs, th, the, draw(st.integers(0, 15))


def test_nibble_layout_is_the_documented_one():
    """Every value -8..7 at an even and an odd column of an odd-width row; the byte values spelled out."""
    values = torch.arange(-8, 8, dtype=torch.int8)
    counters = torch.stack([values, values.flip(0), torch.zeros(16, dtype=torch.int8)], dim=1)  # k = 3
    packed = pack_nibbles(counters)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 2)
    assert torch.equal(packed, nibbles_by_hand(counters))
    assert torch.equal(unpack_nibbles(packed, 3), counters)
    assert pack_nibbles(torch.tensor([[-1, 2, -8]])).tolist() == [[0x2F, 0x08]]  # low nibble = even column
    assert unpack_nibbles(torch.tensor([[0x2F, 0xF8]], dtype=torch.uint8), 3).tolist() == [[-1, 2, -8]]  # pad ignored
    assert pack_nibbles(torch.zeros((0, 5), dtype=torch.int8)).shape == (0, 3)
    for bad in (torch.tensor([[8]]), torch.tensor([[-9, 0]])):
        with pytest.raises(ValueError, match="-8..7"):
            pack_nibbles(bad)
    with pytest.raises(ValueError, match="uint8"):
        unpack_nibbles(packed, 5)


@given(nibble_cases())
def test_nibble_triton_matches_reference(kernel_device, case):
    """Exact equality, with garbage in the padding nibble of odd-width rows; inputs untouched."""
    (packed, exp, counters, e_accum, grad), k, gs, th, the, pad = case
    inputs = (packed, exp, with_padding(nibbles_by_hand(counters), k, pad), e_accum, grad)
    want = ternary_update_reference(*inputs, k, gs, th, the, counter_bits=4)
    dev_inputs = [x.to(kernel_device) for x in inputs]
    assert_same(ternary_update_triton(*dev_inputs, k, gs, th, the, counter_bits=4), want)
    assert_same(ternary_update_nibble(*dev_inputs, k, gs, th, the), want)
    for before, after in zip(inputs, dev_inputs):
        assert torch.equal(before, after.cpu()) or (before.is_floating_point() and
                                                     torch.equal(before.isnan(), after.cpu().isnan()))


@given(nibble_cases())
def test_nibble_rule_is_the_int8_rule(kernel_device, case):
    """Counters within -8..7 and θ <= 7: the 4-bit op (reference, Triton, the op) gives exactly the 8-bit op's trits,
    exponents, counts and counters, the counters laid out by hand (padding nibble 0 whatever came in)."""
    (packed, exp, counters, e_accum, grad), k, gs, th, the, pad = case
    p, e, ta, ea, flips, moves = ternary_update_reference(packed, exp, counters, e_accum, grad, k, gs, th, the)
    want = (p, e, nibbles_by_hand(ta), ea, flips, moves)
    nib = with_padding(nibbles_by_hand(counters), k, pad)
    assert_same(ternary_update_reference(packed, exp, nib, e_accum, grad, k, gs, th, the, counter_bits=4), want)
    dev = [x.to(kernel_device) for x in (packed, exp, nib, e_accum, grad)]
    assert_same(ternary_update_triton(*dev, k, gs, th, the, counter_bits=4), want)
    assert_same(ternary_update_nibble(*dev, k, gs, th, the), want)


@pytest.mark.parametrize("trit,start,vote,want_trit,want_counter,want_flips", [
    (1, 7, 1, 1, 7, 0),  # held at +7 by 20 more up-votes: never wraps to -8
    (-1, -7, -1, -1, -7, 0),  # held at -7
    (-1, -8, -1, -1, -7, 0),  # -8 (representable, never produced) clamps to -θ at once
    (1, -8, -1, -1, -7, 2),  # -8 - 1 clamps to -7 = -θ: moves at step 1, again at step 8, then holds at -7
    (0, 6, 1, 1, 7, 1),  # moves at step 1, then counts up to +7 and holds
])
def test_nibble_counters_saturate_at_the_limits(kernel_device, trit, start, vote, want_trit, want_counter, want_flips):
    """θ = 7 (the most a nibble holds), odd k: 20 steps of one vote on every weight."""
    n, k, gs, th = 3, 9, 4, 7
    packed = pack_reference(torch.full((n, k), trit, dtype=torch.int8)).to(kernel_device)
    exp = torch.zeros((n, n_groups(k, gs)), dtype=torch.int8, device=kernel_device)
    nib = pack_nibbles(torch.full((n, k), start, dtype=torch.int8)).to(kernel_device)
    grad = torch.full((n, k), -float(vote), device=kernel_device)
    for impl in NIBBLE_IMPLS:
        state, flips = [packed, exp, nib, exp.clone()], 0
        for _ in range(20):
            *state, f, _ = impl(*state, grad, k, gs, th, 127)
            flips += f.item()
        assert torch.all(unpack_reference(state[0].cpu(), k) == want_trit)
        assert torch.equal(state[2].cpu(), nibbles_by_hand(torch.full((n, k), want_counter, dtype=torch.int8)))
        assert flips == want_flips * n * k


# ---------------------------------------------------------------- 8. a list of weights in one op (update_group.py)


@st.composite
def group_cases(draw, max_weights: int = 4):
    """(mode, flip θ, exp θ, per-weight (inputs, k, group_size), step, cutoff, seeds) for 1..max_weights weights of
    one flip mode ("counter", "nibble" or "stochastic"), some of them with no rows."""
    mode = draw(st.sampled_from(("counter", "nibble", "stochastic")))
    th = draw(st.integers(1, 7)) if mode == "nibble" else draw(THRESHOLDS)
    the = draw(THRESHOLDS)
    weights = []
    for _ in range(draw(st.integers(1, max_weights))):
        n, k = draw(st.integers(0, 4)), draw(st.one_of(st.sampled_from(SPECIAL_K[:12]), st.integers(1, 40)))
        gs = draw(st.sampled_from(GROUP_SIZES))
        modes = [draw(st.sampled_from(m)) for m in (("uniform", "edge"), ("uniform", "edge"), ("mixed", "special"))]
        seed = draw(st.integers(0, 2**31 - 1))
        packed, exp, t_accum, e_accum, grad = make_case(n, k, gs, th, the, *modes, seed=seed)
        t_accum = pack_nibbles(t_accum) if mode == "nibble" else t_accum
        weights.append(((packed, exp, t_accum, e_accum, grad), k, gs))
    step, cutoff, seeds = None, None, []
    if mode == "stochastic":
        step = torch.tensor(draw(st.sampled_from(EXTREME_STEPS)))
        cutoff = draw(st.one_of(st.just(flip_cutoff(step, th)), st.sampled_from(EXTREME_CUTOFFS).map(torch.tensor)))
        seeds = [draw(st.integers(0, 2**32 - 1)) for _ in weights]
    return mode, th, the, weights, step, cutoff, seeds


def group_args(case, device: str) -> tuple:
    """The group op's arguments of a :func:`group_cases` case, tensors on ``device``."""
    mode, th, the, weights, step, cutoff, seeds = case
    lists = [[w[0][j].to(device) for w in weights] for j in range(5)]
    if mode == "stochastic":
        lists[2] = []
        step, cutoff = step.to(device), cutoff.to(device)
    return (*lists, step, cutoff, [w[1] for w in weights], [w[2] for w in weights], 0 if mode == "stochastic" else th,
            the, 4 if mode == "nibble" else 8, seeds)


def single_weight_results(case) -> list[tuple]:
    """Each weight of a group case through its single-weight reference: (packed', exp', t_accum' or None,
    e_accum', flips, exp_moves)."""
    mode, th, the, weights, step, cutoff, seeds = case
    out = []
    for ((packed, exp, t_accum, e_accum, grad), k, gs), seed in zip(weights, seeds or [None] * len(weights)):
        if mode == "stochastic":
            p, e, a, f, m = ternary_update_stochastic_reference(packed, exp, e_accum, grad, step, cutoff, k, gs, the,
                                                                seed)
            out.append((p, e, None, a, f, m))
        else:
            out.append(ternary_update_reference(packed, exp, t_accum, e_accum, grad, k, gs, th, the,
                                                counter_bits=4 if mode == "nibble" else 8))
    return out


@given(group_cases())
def test_group_matches_the_single_weight_ops(kernel_device, case):
    """Reference (CPU op) and kernels alike: every weight's slice of the flat outputs is its single-weight update,
    the counts are the totals, and the bytes between weights are zero."""
    want = single_weight_results(case)
    for update, device in ((ternary_update_group, "cpu"), (ternary_update_group_triton, kernel_device)):
        args = group_args(case, device)
        got = update(*args)
        assert int(got[4]) == sum(int(w[4]) for w in want) and int(got[5]) == sum(int(w[5]) for w in want)
        for j, name in enumerate(("packed", "exp", "t_accum", "e_accum")):
            if not args[j]:
                assert got[j].numel() == 0 and got[j].dtype == torch.int8, name
                continue
            slices = unflatten(got[j], args[j])
            assert all(torch.equal(s.cpu(), w[j]) for s, w in zip(slices, want)), f"{name} differs ({device})"
            assert int(got[j].ne(0).sum()) == sum(int(s.ne(0).sum()) for s in slices), f"{name}: gaps not zero"
            offsets, total = flat_offsets(args[j])
            assert got[j].numel() == total and all(o % FLAT_ALIGN == 0 for o in offsets)


def _group_bad_cases() -> list:
    packed, exp, t_accum, e_accum, grad = make_case(3, 12, 4, 8, 8, "uniform", "uniform", "mixed", seed=0)
    step, cutoff = torch.tensor(3), torch.tensor(2**20)
    ok = dict(packed=[packed], exp=[exp], t_accum=[t_accum], e_accum=[e_accum], grad=[grad], step=None, cutoff=None,
              ks=[12], group_sizes=[4], flip_threshold=8, exp_threshold=8, counter_bits=8, seeds=[])
    stochastic = {**ok, "t_accum": [], "step": step, "cutoff": cutoff, "flip_threshold": 0, "seeds": [5]}
    return [
        ({**ok, **{name: [] for name in ("packed", "exp", "t_accum", "e_accum", "grad", "ks", "group_sizes")}},
         "at least one weight"),
        ({**ok, "exp": [exp, exp]}, "one exp per weight"),
        ({**ok, "ks": []}, "one ks per weight"),
        ({**ok, "t_accum": []}, "one t_accum per weight"),
        ({**ok, "seeds": [1]}, "counter flips take no seeds"),
        ({**ok, "step": step}, "step and cutoff go together"),
        ({**stochastic, "cutoff": None}, "step and cutoff go together"),
        ({**stochastic, "t_accum": [t_accum]}, "keep no counters"),
        ({**stochastic, "seeds": []}, "one seeds per weight"),
        ({**stochastic, "seeds": [2**32]}, "weight 0: seed must be"),
        ({**ok, "packed": [packed, packed], "exp": [exp, exp[:, :1]], "t_accum": [t_accum] * 2,
          "e_accum": [e_accum] * 2, "grad": [grad] * 2, "ks": [12] * 2, "group_sizes": [4] * 2},
         "weight 1: exp must be"),
        ({**ok, "flip_threshold": 128}, "weight 0: flip_threshold must be in"),
    ]


@pytest.mark.parametrize("args,match", _group_bad_cases())
def test_group_bad_arguments_raise_value_error(kernel_device, args, match):
    for update in (ternary_update_group, ternary_update_group_triton):
        with pytest.raises(ValueError, match=match):
            update(**args)


@pytest.mark.slow
def test_group_compiled_matches_eager_and_passes_opcheck():
    """Both flip modes in one compiled function (the flat outputs and their views traced), and torch.library's
    schema, fake and dispatch checks."""
    case_w = [make_case(n, k, gs, 3, 5, "edge", "edge", "mixed", seed=n) for n, k, gs in ((5, 37, 6), (2, 64, 32))]
    lists = [[w[j] for w in case_w] for j in range(5)]
    ks, gss = [37, 64], [6, 32]
    step = torch.tensor(7)

    def both(packed, exp, t_accum, e_accum, grad, step):
        counter = torch.ops.arbfn.ternary_update_group(packed, exp, t_accum, e_accum, grad, None, None, ks, gss, 3, 5,
                                                       8, [])
        stochastic = torch.ops.arbfn.ternary_update_group(packed, exp, [], e_accum, grad, step, flip_cutoff(step, 2),
                                                          ks, gss, 0, 5, 8, [11, 12])
        return [*unflatten(counter[0], packed), *unflatten(stochastic[0], packed), counter[4] + stochastic[4]]

    torch._dynamo.reset()
    want = both(*lists, step)
    assert int(want[-1]) > 0
    got = torch.compile(both, fullgraph=True)(*lists, step)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    torch.library.opcheck(torch.ops.arbfn.ternary_update_group.default,
                          (*lists, None, None, ks, gss, 3, 5, 8, []))
    torch.library.opcheck(torch.ops.arbfn.ternary_update_group.default,
                          (lists[0], lists[1], [], lists[3], lists[4], step, flip_cutoff(step, 2), ks, gss, 0, 5, 8,
                           [11, 12]))
