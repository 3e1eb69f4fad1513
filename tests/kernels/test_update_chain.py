"""Properties of ``arbfn::ternary_update_chain`` (kernels/update_chain.py): the place-bit layout, the move
probability, the chain's moves against a plain-Python restatement where every vote moves, the hashed move rate,
determinism, argument validation, opcheck and torch.compile; and its Triton kernel against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.packing import pack_reference, unpack_reference, validate_packed
from kernels.update import draws, step_key
from kernels.update_chain import (_chain_kernel, check_chain_args, move_probability, pack_places, places_width,
                                  ternary_update_chain, ternary_update_chain_reference, ternary_update_chain_triton,
                                  unpack_places)

ALWAYS = torch.tensor(1 << 24)  # the cutoff of θ 1: every draw falls below it
STEP = torch.tensor(7)


def case(n: int, k: int, seed: int, grad: torch.Tensor | None = None):
    """(packed, places, grad, trits, bits) with random trits, place bits and fp32 gradients."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    bits = torch.randint(0, 2, (n, k), generator=gen)
    grad = torch.randn((n, k), generator=gen) if grad is None else grad
    return pack_reference(trits), pack_places(bits), grad, trits.to(torch.int64), bits


@given(n=st.integers(1, 5), k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_places_round_trip_with_zero_high_bits(n, k, seed):
    bits = torch.randint(0, 2, (n, k), generator=torch.Generator().manual_seed(seed))
    words = pack_places(bits)
    assert words.dtype == torch.int16 and tuple(words.shape) == (n, places_width(k)) and places_width(k) == -(-k // 16)
    assert torch.equal(unpack_places(words, k), bits)
    assert not unpack_places(words, places_width(k) * 16)[:, k:].any()


def test_bit_15_is_the_sign_bit_of_its_word():
    bits = torch.zeros((1, 16), dtype=torch.int64)
    bits[0, 15] = 1
    assert pack_places(bits).item() == -(2**15)
    assert pack_places(torch.ones((1, 16), dtype=torch.int64)).item() == -1


def test_move_probability_divides_by_the_groups_rms_over_its_real_columns():
    g = torch.tensor([[3.0, -4.0, 0.0, 0.0, 2.0, -2.0]])  # groups of 4: rms 2.5 over 4 columns, 2 over the last 2
    ratio = torch.tensor([[3 / 2.5, 4 / 2.5, 0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(move_probability(g, 4, 2.0, 1.0), (ratio / 2).clamp(max=1.0))
    assert torch.allclose(move_probability(g, 4, 0.5, 3.0), (ratio * 2).clamp(max=1.0) ** 3)
    assert torch.allclose(move_probability(g.to(torch.bfloat16), 4, 2.0, 1.0), (ratio / 2).clamp(max=1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_group_with_a_nan_or_infinite_gradient_moves_nothing(bad):
    g = torch.tensor([[1.0, bad, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0]])
    p = move_probability(g, 4, 1.0, 1.0)
    assert not p[0, :4].any() and p[0, 4:].gt(0).all()
    assert not move_probability(torch.zeros((2, 8)), 4, 1.0, 1.0).any()  # all-zero groups: no move, no NaN


def test_tiny_and_huge_gradients_keep_their_ratios():
    for scale in (1e-30, 1e30):
        g = torch.tensor([[1.0, 2.0, 2.0, 4.0]]) * scale
        assert torch.allclose(move_probability(g, 4, 10.0, 1.0), move_probability(g / scale, 4, 10.0, 1.0))


def restated_moves(trits: torch.Tensor, bits: torch.Tensor, grad: torch.Tensor) -> tuple[list, list]:
    """The chain rule in plain Python where every vote moves: (new trits, new bits) as lists."""
    new_t, new_b = [], []
    for t_row, b_row, g_row in zip(trits.tolist(), bits.tolist(), grad.tolist()):
        rt, rb = [], []
        for t, b, g in zip(t_row, b_row, g_row):
            vote = 0 if g == 0 or g != g else (-1 if g > 0 else 1)
            place = min(5, max(0, 2 * (t + 1) + b + vote))
            rt.append(place // 2 - 1)
            rb.append(place % 2)
        new_t.append(rt)
        new_b.append(rb)
    return new_t, new_b


@given(n=st.integers(1, 4), k=st.integers(1, 70), gs=st.sampled_from((4, 8, 32, 64)), seed=st.integers(0, 2**16))
def test_every_vote_moves_its_place_one_step_when_p_is_one(n, k, gs, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn((n, k), generator=gen) * (torch.rand((n, k), generator=gen) > 0.2)  # some zero: no vote
    packed, places, grad, trits, bits = case(n, k, seed, grad)
    new_packed, new_places, flips = ternary_update_chain(packed, places, grad, STEP, ALWAYS, k, gs, 1e-9, 1.0, 3)
    want_t, want_b = restated_moves(trits, bits, grad)
    got_t = unpack_reference(new_packed, k)
    assert got_t.tolist() == want_t and unpack_places(new_places, k).tolist() == want_b
    assert flips.item() == int((got_t.to(torch.int64) != trits).sum())


def test_ends_of_the_chain_hold_and_trits_change_on_crossing():
    trits = torch.tensor([[-1, -1, 1, 1, 0, 0]], dtype=torch.int8)
    bits = torch.tensor([[0, 1, 1, 0, 1, 0]])
    grad = torch.tensor([[1.0, -1.0, -1.0, 1.0, -1.0, 1.0]])  # votes -, +, +, -, +, -
    out = ternary_update_chain(pack_reference(trits), pack_places(bits), grad, STEP, ALWAYS, 6, 8, 1e-9, 1.0, 0)
    # places 0 -1 (held), 1 +1 -> 2 (trit 0), 5 +1 (held), 4 -1 -> 3 (trit 0), 3 +1 -> 4 (trit 1), 2 -1 -> 1 (trit -1)
    assert unpack_reference(out[0], 6).tolist() == [[-1, 0, 1, 0, 1, -1]]
    assert unpack_places(out[1], 6).tolist() == [[0, 0, 1, 1, 0, 1]]
    assert out[2].item() == 4


def test_a_zero_cutoff_moves_nothing():
    packed, places, grad, _, _ = case(8, 40, 0)
    for cut in (0, -5):
        new_packed, new_places, flips = ternary_update_chain(packed, places, grad, STEP, torch.tensor(cut), 40, 8,
                                                             1e-9, 1.0, 0)
        assert torch.equal(new_packed, packed) and torch.equal(new_places, places) and flips.item() == 0


def test_moves_are_the_hashed_draws_below_p_times_the_cutoff():
    n, k, gs, seed = 64, 96, 32, 11
    packed, places, grad, trits, bits = case(n, k, 3)
    cutoff = torch.tensor(1 << 22)  # θ 4
    new_packed, new_places, _ = ternary_update_chain(packed, places, grad, STEP, cutoff, k, gs, 2.0, 3.0, seed)
    place = 2 * (trits + 1) + bits
    moved = 2 * (unpack_reference(new_packed, k).to(torch.int64) + 1) + unpack_places(new_places, k) != place
    go = draws(step_key(STEP, seed), n, k).to(torch.float32) < move_probability(grad, gs, 2.0, 3.0) * float(1 << 22)
    stuck = ((place == 0) & (grad > 0)) | ((place == 5) & (grad < 0))  # a vote off the chain's end moves nothing
    assert torch.equal(moved, go & ~stuck)


def test_the_move_rate_is_p_over_theta():
    n, k = 256, 256
    grad = torch.ones((n, k))  # every ratio is 1 / scale: p = 0.5 ** 2 = 0.25
    packed, places, _, trits, bits = case(n, k, 5)
    start = 2 * (trits + 1) + bits
    new_packed, new_places, _ = ternary_update_chain(packed, places, grad, STEP, torch.tensor(1 << 23), k, 32, 2.0,
                                                     2.0, 9)
    end = 2 * (unpack_reference(new_packed, k).to(torch.int64) + 1) + unpack_places(new_places, k)
    free = start > 0  # a -1 vote from place 0 cannot move
    rate = (end[free] != start[free]).float().mean().item()
    assert rate == pytest.approx(0.25 / 2, abs=4 * math.sqrt(0.125 * 0.875 / free.sum().item()))


def test_same_inputs_same_outputs_and_other_seeds_or_steps_differ():
    packed, places, grad, _, _ = case(16, 64, 2)
    args = (packed, places, grad)
    a = ternary_update_chain(*args, STEP, ALWAYS, 64, 32, 2.0, 1.0, 5)
    b = ternary_update_chain(*args, STEP, ALWAYS, 64, 32, 2.0, 1.0, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (ternary_update_chain(*args, STEP, ALWAYS, 64, 32, 2.0, 1.0, 6),
                  ternary_update_chain(*args, torch.tensor(8), ALWAYS, 64, 32, 2.0, 1.0, 5)):
        assert not torch.equal(a[1], other[1])


def test_bad_arguments_raise():
    packed, places, grad, _, _ = case(2, 10, 0)
    good = dict(packed=packed, places=places, grad=grad, step=STEP, cutoff=ALWAYS, k=10, group_size=8, scale=2.0,
                power=3.0, seed=0)
    check_chain_args(**good)
    for change in ({"places": places.to(torch.int32)}, {"places": torch.zeros((2, 2), dtype=torch.int16)},
                   {"packed": packed.to(torch.int8)}, {"grad": grad.to(torch.int32)}, {"grad": grad[:, :5]},
                   {"step": STEP.view(1)}, {"cutoff": ALWAYS.to(torch.int32)}, {"k": 0}, {"group_size": 3},
                   {"scale": 0.0}, {"scale": math.inf}, {"power": -1.0}, {"power": math.nan}, {"seed": -1},
                   {"seed": 2**32}):
        with pytest.raises(ValueError):
            ternary_update_chain_reference(**{**good, **change})


def test_opcheck_and_compiled_equal_eager():
    packed, places, grad, _, _ = case(8, 70, 4)
    args = (packed, places, grad, STEP, torch.tensor(1 << 21), 70, 32, 2.0, 3.0, 12)
    torch.library.opcheck(torch.ops.arbfn.ternary_update_chain.default, args)

    def two_steps(packed, places, grad):
        p1, b1, f1 = ternary_update_chain(packed, places, grad, STEP, ALWAYS, 70, 32, 2.0, 3.0, 1)
        p2, b2, f2 = ternary_update_chain(p1, b1, -grad, STEP + 1, ALWAYS, 70, 32, 2.0, 3.0, 1)
        return p2, b2, f1 + f2

    compiled = torch.compile(two_steps, fullgraph=True)
    assert all(torch.equal(x, y) for x, y in zip(compiled(packed, places, grad), two_steps(packed, places, grad)))


def borderline(packed, places, grad, step, cutoff, k, gs, scale, power, seed) -> torch.Tensor:
    """Where the reference's draw lies within float32 rounding of p * cutoff: two implementations may differ
    there (their sums run in other orders)."""
    bound = float(cutoff.clamp(0, 1 << 24))
    u = draws(step_key(step, seed), packed.shape[0], k).to(torch.float64)
    edge = move_probability(grad, gs, scale, power).to(torch.float64) * bound
    return (u - edge).abs() <= 1e-5 * max(bound, 1.0)


@given(n=st.integers(1, 6), k=st.integers(1, 300), gs=st.sampled_from((8, 16, 32, 64)),
       power=st.sampled_from((1.0, 3.0, 4.5)), cut=st.sampled_from((0, 1, 1 << 20, 1 << 23, 1 << 24, 1 << 30)),
       special=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_kernel_matches_the_reference(kernel_device, n, k, gs, power, cut, special, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn((n, k), generator=gen) * torch.rand((n, k), generator=gen).gt(0.1)
    if special:  # zeros, NaN, infinities, tiny and huge values
        picks = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 3e38, 1e-45, 1.0])
        spots = torch.rand((n, k), generator=gen) < 0.05
        grad = torch.where(spots, picks[torch.randint(0, len(picks), (n, k), generator=gen)], grad)
    packed, places, grad, _, _ = case(n, k, seed, grad)
    args = (packed, places, grad, torch.tensor(seed % 5), torch.tensor(cut), k, gs, 2.0, power, seed)
    want = ternary_update_chain_reference(*args)
    got = ternary_update_chain_triton(*(a.to(kernel_device) if isinstance(a, torch.Tensor) else a for a in args))
    got = [x.cpu() for x in got]
    validate_packed(got[0], k)
    free = ~borderline(*args)
    assert torch.equal(unpack_reference(got[0], k)[free], unpack_reference(want[0], k)[free])
    assert torch.equal(unpack_places(got[1], k)[free], unpack_places(want[1], k)[free])
    if k % 16:  # a row's place bits beyond k stay zero
        assert not ((got[1][:, -1].to(torch.int64) & 0xFFFF) >> (k % 16)).any()
    if bool(free.all()):
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_triton_kernel_refuses_other_group_sizes():
    packed, places, grad, _, _ = case(2, 24, 0)
    with pytest.raises(ValueError, match="group sizes 8, 16, 32 or 64"):
        ternary_update_chain_triton(packed, places, grad, STEP, ALWAYS, 24, 6, 2.0, 3.0, 0)


def test_the_tuner_restores_the_packed_copy_the_kernel_adds_into():
    """Timed runs on the real arguments must not add their trit moves again (see tests/kernels/test_tuning.py)."""
    assert _chain_kernel.protected == {"reset_to_zero": ["count_ptr"], "restore_value": ["new_packed_ptr"]}
