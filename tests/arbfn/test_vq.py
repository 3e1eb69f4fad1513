"""Tests of arbfn.layers.vq (shared VQ codebook) and arbfn.layers.bridge (multimodal VQ bridge)."""

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from arbfn.layers.bridge import BridgeOutput, bridge, init_bridge
from arbfn.layers.vq import INT16_MAX, VQOutput, candidate_ids, init_vq, update_vq_counters, vq
from arbfn.ternary import attach_probes, decode, is_ternary, linear, make_probes, weights

INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probe_grads(params, loss_fn):
    """dL/dW for every ternary weight of ``params`` (the train step's probe path), keyed by weight order."""
    leaves, spec = pytree.tree_flatten(make_probes(params))
    live = [i for i, leaf in enumerate(leaves) if leaf is not None]

    def loss_of(live_leaves):
        full = list(leaves)
        for i, leaf in zip(live, live_leaves):
            full[i] = leaf
        return loss_fn(attach_probes(params, pytree.tree_unflatten(full, spec)))

    return torch.func.grad(loss_of)([leaves[i] for i in live])


def z64(p, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ decode(p["proj_in"]).double().T


def dist64(p, x: torch.Tensor) -> torch.Tensor:
    """Float64 squared distances [..., n_codes] from z to every code (the brute-force oracle)."""
    book = decode(p["codebook"]).double()
    return (z64(p, x).unsqueeze(-2) - book).square().sum(-1)


def assert_integer_tree(tree) -> None:
    bad = [(pytree.keystr(k), v.dtype) for k, v in pytree.tree_flatten_with_path(tree)[0]
           if isinstance(v, torch.Tensor) and v.dtype not in INTEGER_DTYPES]
    assert bad == []


# ---------------------------------------------------------------- vq

@pytest.mark.parametrize("d_in,code_dim,n_codes,gs,lead", [
    (12, 8, 50, 4, (2, 3)), (7, 5, 1, 5, (1,)), (13, 11, 97, 16, (3, 1, 2)), (16, 32, 8192, 32, ())])
def test_vq_shapes_dtypes(d_in, code_dim, n_codes, gs, lead):
    p = init_vq(d_in, code_dim, n_codes, gs, gen(0))
    out = vq(p, torch.randn(*lead, d_in, generator=gen(1)))
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == (*lead, d_in) and out.quantized.dtype == torch.float32
    assert out.indices.shape == lead and out.indices.dtype == torch.int64
    assert out.commitment.shape == () and bool(torch.isfinite(out.commitment))
    assert bool(((out.indices >= 0) & (out.indices < n_codes)).all())


def test_vq_params_integer_deterministic_and_meta():
    p = init_vq(12, 8, 50, 4, gen(0))
    assert set(p) == {"proj_in", "codebook", "proj_out", "usage"}
    shapes = {k: (w.out_features, w.in_features) for k, w in p.items() if is_ternary(w)}
    assert shapes == {"proj_in": (8, 12), "codebook": (50, 8), "proj_out": (12, 8)}
    assert p["usage"].dtype == torch.int16 and p["usage"].shape == (50,) and int(p["usage"].abs().sum()) == 0
    assert int(p["codebook"].exp.abs().max()) == 0, "unit-scale codes"
    assert_integer_tree(p)
    q = init_vq(12, 8, 50, 4, gen(0))
    for a, b in zip(pytree.tree_leaves(p), pytree.tree_leaves(q)):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)
    meta = init_vq(12, 8, 50, 4, None)
    assert all(t.is_meta for t in pytree.tree_leaves(meta) if isinstance(t, torch.Tensor))
    assert [w.num_weights for w in weights(meta)] == [w.num_weights for w in weights(p)]


@pytest.mark.parametrize("d_in,code_dim,n_codes,gs,seed", [
    (12, 8, 50, 4, 0), (5, 3, 7, 5, 1), (13, 11, 97, 16, 2), (24, 16, 1000, 8, 3), (9, 4, 2, 4, 4)])
def test_exact_mode_is_the_float64_argmin(d_in, code_dim, n_codes, gs, seed):
    p = init_vq(d_in, code_dim, n_codes, gs, gen(seed))
    x = torch.randn(4, 9, d_in, generator=gen(seed + 100))
    idx = vq(p, x).indices
    d = dist64(p, x)
    best = d.min(-1).values
    chosen = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, best, rtol=0, atol=1e-4)  # ties (and fp32 near-ties) aside
    second = d.topk(2, largest=False).values[..., 1] if n_codes > 1 else best + 1
    clear = second - best > 1e-3
    assert torch.equal(idx[clear], d.argmin(-1)[clear])


def test_quantized_and_commitment_values():
    p = init_vq(12, 8, 50, 4, gen(0))
    x = torch.randn(3, 5, 12, generator=gen(1))
    out = vq(p, x)
    code = decode(p["codebook"])[out.indices]
    z = linear(p["proj_in"], x)
    assert torch.allclose(out.quantized, linear(p["proj_out"], code), atol=1e-5)
    assert torch.allclose(out.commitment, 1.25 * (z - code).square().mean(), atol=1e-6)


@pytest.mark.parametrize("n_codes,k,code_dim", [(300, 16, 8), (1009, 64, 5), (50, 7, 20)])
def test_candidate_mode_picks_the_best_candidate_deterministically(n_codes, k, code_dim):
    p = init_vq(10, code_dim, n_codes, 4, gen(0))
    x = torch.randn(5, 7, 10, generator=gen(1))
    out = vq(p, x, exact_limit=0, n_candidates=k)
    assert torch.equal(out.indices, vq(p, x, exact_limit=0, n_candidates=k).indices)
    cand = candidate_ids(linear(p["proj_in"], x), n_codes, k)
    assert cand.shape == (5, 7, k) and torch.equal(cand, candidate_ids(linear(p["proj_in"], x), n_codes, k))
    assert bool((cand == out.indices.unsqueeze(-1)).any(-1).all()), "the pick is one of the candidates"
    d = dist64(p, x)
    best_cand = d.gather(-1, cand).min(-1).values
    chosen = d.gather(-1, out.indices.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, best_cand, rtol=0, atol=1e-4)
    assert bool((chosen >= d.min(-1).values - 1e-9).all())


def test_candidates_follow_the_sign_pattern():
    z = torch.tensor([[0.5, -1.0, 2.0], [3.0, -0.1, 0.2], [0.5, 1.0, 2.0]])
    c = candidate_ids(z, 1000, 4)
    assert torch.equal(c[0], c[1]), "same signs, same bucket"
    assert not torch.equal(c[0], c[2])
    assert torch.equal((c[0] - c[0, 0]) % 1000, torch.arange(4)), "a window of consecutive ids mod n_codes"


@pytest.mark.parametrize("n_codes,k", [(37, 37), (20, 64), (1, 3)])
def test_candidate_mode_covering_the_book_equals_exact(n_codes, k):
    p = init_vq(9, 6, n_codes, 4, gen(2))
    x = torch.randn(6, 9, generator=gen(3))
    exact = vq(p, x)
    cand = vq(p, x, exact_limit=0, n_candidates=k)
    assert torch.equal(exact.indices, cand.indices)
    assert torch.equal(exact.quantized, cand.quantized)


class _NoBookSizedTensors(TorchDispatchMode):
    """Records every op output with at least ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                self.big.append((str(func), tuple(t.shape)))
        return out


def test_huge_book_candidate_mode_never_touches_the_whole_table():
    n_codes = 200_000
    p = init_vq(8, 8, n_codes, 8, gen(0))
    x = torch.randn(3, 10, 8, generator=gen(1))  # 30 tokens x 64 candidates x 8 dims << n_codes
    with _NoBookSizedTensors(n_codes) as mode:
        out = vq(p, x)  # n_codes > exact_limit: candidate mode by default
    assert mode.big == [], f"book-sized tensors formed: {mode.big}"
    assert out.indices.shape == (3, 10)
    with _NoBookSizedTensors(n_codes) as mode:
        q = update_vq_counters(p, out.indices)
    assert len(mode.big) <= 1, f"more than the new usage vector was book-sized: {mode.big}"
    assert int(q["usage"].sum()) == 30


def test_gradients_reach_every_probe():
    p = init_vq(12, 8, 50, 4, gen(0))
    x = torch.randn(2, 6, 12, generator=gen(1))
    for kwargs in ({}, {"exact_limit": 0, "n_candidates": 8}):
        def loss(q):
            out = vq(q, x, **kwargs)
            return out.quantized.square().sum() + out.commitment
        g_in, g_book, g_out = probe_grads(p, loss)
        assert g_in.shape == (8, 12) and g_book.shape == (50, 8) and g_out.shape == (12, 8)
        assert all(bool(g.abs().sum() > 0) for g in (g_in, g_book, g_out))
        used = torch.zeros(50, dtype=torch.bool)
        used[vq(p, x, **kwargs).indices.reshape(-1)] = True
        assert bool((g_book[used].abs().sum(-1) > 0).all()) and int(g_book[~used].abs().sum()) == 0


def test_straight_through_gradient_to_the_input():
    p = init_vq(12, 8, 50, 4, gen(0))
    x = torch.randn(3, 12, generator=gen(1), requires_grad=True)
    v = torch.randn(3, 12, generator=gen(2))
    (gx,) = torch.autograd.grad((vq(p, x).quantized * v).sum(), x)
    expected = v.double() @ decode(p["proj_out"]).double() @ decode(p["proj_in"]).double()  # quantizer = identity
    assert torch.allclose(gx.double(), expected, atol=1e-4)


def test_codebook_gradient_is_the_commitment_pull():
    p = init_vq(12, 8, 50, 4, gen(0))
    x = torch.randn(1, 12, generator=gen(1))
    (_, g_book, _) = probe_grads(p, lambda q: vq(q, x).commitment)
    i = int(vq(p, x).indices[0])
    z = linear(p["proj_in"], x)[0]
    expected = 2 * (decode(p["codebook"])[i] - z) / 8  # d/dc mean((c - z)^2), codebook term only
    assert torch.allclose(g_book[i], expected, atol=1e-5)


def test_update_vq_counters_exact_saturating_and_pure():
    p = init_vq(4, 3, 10, 4, gen(0))
    usage = torch.tensor([0, 5, INT16_MAX - 2, INT16_MAX, 0, 0, 0, 0, 0, 7], dtype=torch.int16)
    p = {**p, "usage": usage}
    before = usage.clone()
    q = update_vq_counters(p, torch.tensor([[1, 1, 2, 2, 2], [2, 2, 3, 9, 1]]))
    assert torch.equal(usage, before), "inputs are not mutated"
    expected = torch.tensor([0, 8, INT16_MAX, INT16_MAX, 0, 0, 0, 0, 0, 8], dtype=torch.int16)
    assert q["usage"].dtype == torch.int16 and torch.equal(q["usage"], expected)
    assert q["codebook"] is p["codebook"]
    assert torch.equal(update_vq_counters(p, torch.empty(0, dtype=torch.int64))["usage"], usage)
    one = update_vq_counters(p, torch.tensor([4], dtype=torch.int32))["usage"]
    assert int(one[4]) == 1 and int((one != usage).sum()) == 1


def test_vq_errors():
    p = init_vq(12, 8, 50, 4, gen(0))
    with pytest.raises(ValueError, match="12"):
        vq(p, torch.randn(2, 11))
    with pytest.raises(TypeError, match="floating"):
        vq(p, torch.ones(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_candidates"):
        vq(p, torch.randn(2, 12), n_candidates=0)
    with pytest.raises(ValueError, match="n_codes"):
        init_vq(12, 8, 0, 4, gen(0))
    with pytest.raises(TypeError, match="integer"):
        update_vq_counters(p, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        update_vq_counters(p, torch.tensor([50]))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        update_vq_counters(p, torch.tensor([-1]))


# ---------------------------------------------------------------- bridge

MODS = ("text", "image", "audio")


@pytest.fixture(scope="module")
def bridge_params():
    return init_bridge(16, MODS, 8, gen(0)), init_vq(16, 8, 64, 8, gen(1))


def seqs(b: int, lens: dict[str, int], d: int = 16, seed: int = 2) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {m: torch.randn(b, t, d, generator=g) for m, t in lens.items()}


def test_bridge_shapes_spans_and_one_shared_codebook(bridge_params):
    p, vq_p = bridge_params
    s = seqs(1, {"audio": 36, "text": 8, "image": 254})  # dict order differs from the modality order
    out = bridge(p, vq_p, s)
    assert isinstance(out, BridgeOutput)
    assert out.quantized.shape == (1, 298, 16) and out.indices.shape == (1, 298)
    assert out.spans == {"text": (0, 8), "image": (8, 262), "audio": (262, 298)}
    cat = torch.cat([linear(p[m], s[m]) for m in MODS], dim=1)
    ref = vq(vq_p, cat)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.quantized, ref.quantized)
    assert torch.equal(out.commitment, ref.commitment)
    for m, (a, b) in out.spans.items():  # each modality's slice is its own projection through the one book
        assert torch.equal(out.indices[:, a:b], vq(vq_p, linear(p[m], s[m])).indices)


def test_bridge_subset_and_vq_kwargs(bridge_params):
    p, vq_p = bridge_params
    s = seqs(2, {"audio": 3, "text": 5})
    out = bridge(p, vq_p, s, exact_limit=0, n_candidates=4)
    assert out.spans == {"text": (0, 5), "audio": (5, 8)} and out.indices.shape == (2, 8)
    cat = torch.cat([linear(p["text"], s["text"]), linear(p["audio"], s["audio"])], dim=1)
    assert torch.equal(out.indices, vq(vq_p, cat, exact_limit=0, n_candidates=4).indices)


def test_bridge_params_and_gradients(bridge_params):
    p, vq_p = bridge_params
    assert_integer_tree(p)
    assert list(p) == list(MODS) and all((w.out_features, w.in_features) == (16, 16) for w in p.values())
    assert all(w.packed.is_meta for w in init_bridge(16, MODS, 8, None).values())
    s = seqs(1, {"text": 2, "image": 3, "audio": 2})

    def loss(tree):
        out = bridge(tree["bridge"], tree["vq"], s)
        return out.quantized.square().sum() + out.commitment

    grads = probe_grads({"bridge": p, "vq": vq_p}, loss)
    assert len(grads) == 6 and all(bool(g.abs().sum() > 0) for g in grads)


def test_bridge_errors(bridge_params):
    p, vq_p = bridge_params
    with pytest.raises(ValueError, match="unknown modalities"):
        bridge(p, vq_p, seqs(1, {"video": 2}))
    with pytest.raises(ValueError, match="at least one"):
        bridge(p, vq_p, {})
    with pytest.raises(ValueError, match="audio"):
        bridge(p, vq_p, {**seqs(1, {"text": 2}), **seqs(2, {"audio": 2})})
    with pytest.raises(ValueError, match="image"):
        bridge(p, vq_p, {**seqs(1, {"text": 2}), **seqs(1, {"image": 2}, d=15)})
    with pytest.raises(ValueError, match="image"):
        bridge(p, vq_p, {"image": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="distinct"):
        init_bridge(16, ("text", "text"), 8, gen(0))
    with pytest.raises(ValueError, match="distinct"):
        init_bridge(16, (), 8, gen(0))
