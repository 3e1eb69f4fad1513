"""Tests of arbfn.twin (the float twin of the byte path) and arbfn.compare / `arbfn compare`."""

import dataclasses
import json
import math

import pytest
import torch

from arbfn import data
from arbfn.cli import main
from arbfn.compare import byte_path_config, byte_path_weights, compare, format_table, write_outputs
from arbfn.config import Config, ModelConfig, TrainConfig, preset
from arbfn.model import apply_model, init_model
from arbfn.ternary import decode, init_exponent, weights
from arbfn.twin import FloatTwin, evaluate_twin, make_optimizer, twin_step

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = {"bpb_ternary", "bpb_float", "steps", "ratio", "bytes_per_weight", "curves"}
SMALL = Config("small-test", ModelConfig(d_embed=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_context=16),
               train=TrainConfig(batch_size=2, context=16, steps=3, eval_batches=1))


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return data.load_corpus()[:20000]


@pytest.fixture(scope="module")
def small_run(corpus):
    """compare() on SMALL for 3 steps, evaluating every 2, recording every batch each side saw."""
    seen: list[tuple[str, int, torch.Tensor]] = []
    result = compare(SMALL, corpus, eval_every=2, on_batch=lambda side, i, b: seen.append((side, i, b.clone())))
    return result, seen


@pytest.mark.parametrize("cfg", [preset("tiny"), SMALL], ids=["tiny", "small-test"])
def test_twin_mirrors_ternary_byte_path_shapes(cfg):
    """Same parameter count and the same multiset of weight shapes as the ternary byte path."""
    cfg = byte_path_config(cfg)
    state = init_model(cfg)  # shape-only
    twin = FloatTwin(cfg.model)
    assert sum(p.numel() for p in twin.parameters()) == byte_path_weights(state)
    ternary_shapes = sorted((w.out_features, w.in_features) for area in ("text", "blocks", "norm", "head")
                            for w in weights(state.params[area]))
    twin_shapes = sorted(tuple(p.shape) if p.dim() == 2 else (1, p.shape[0]) for p in twin.parameters())
    assert twin_shapes == ternary_shapes


@torch.no_grad()
def _load_ternary(twin: FloatTwin, params: dict) -> None:
    """Copy the decoded ternary byte-path weights into the twin (RMSNorm gains [1, d] -> [d])."""
    pairs = [(twin.embed, params["text"]["embed"]), (twin.proj, params["text"]["proj"]),
             (twin.norm, params["norm"]), (twin.head, params["head"])]
    for blk, bp in zip(twin.blocks, params["blocks"], strict=True):
        pairs += [(blk.norm1, bp["norm1"]), (blk.norm2, bp["norm2"]), (blk.up, bp["mlp"]["up"]),
                  (blk.down, bp["mlp"]["down"])] + [(getattr(blk, n), bp["attn"][n]) for n in "qkvo"]
    for module, w in pairs:
        module.weight.copy_(decode(w).view_as(module.weight))


def test_twin_with_the_ternary_weights_computes_the_ternary_logits():
    """The twin is the byte path exactly: loaded with the decoded ternary weights it gives the same logits."""
    cfg = byte_path_config(dataclasses.replace(SMALL, model=dataclasses.replace(SMALL.model, n_layers=2)))
    state = init_model(cfg, torch.Generator().manual_seed(3))
    twin = FloatTwin(cfg.model)
    _load_ternary(twin, state.params)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(twin(ids), apply_model(state, ids), atol=1e-4, rtol=1e-4)


def test_byte_path_config_switches_only_the_extras_off():
    cfg = byte_path_config(preset("tiny"))
    m = cfg.model
    assert not (m.enable_vq or m.enable_graph or m.enable_memory or m.enable_moe)
    assert dataclasses.replace(m, enable_vq=True, enable_graph=True, enable_memory=True,
                               enable_moe=True) == preset("tiny").model


def test_twin_forward_shapes_and_causality():
    m = SMALL.model
    twin = FloatTwin(m, torch.Generator().manual_seed(0))
    ids = torch.randint(0, m.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    logits = twin(ids)
    assert logits.shape == (3, 7, m.vocab_size) and logits.dtype == torch.float32
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % m.vocab_size
    torch.testing.assert_close(twin(changed)[:, :4], logits[:, :4])  # no position sees the future
    assert not torch.allclose(twin(changed)[:, 4:], logits[:, 4:])


def test_twin_init_matches_ternary_element_std():
    """Weights at 2**e * sqrt(2/3) (the ternary init's element std), RMSNorm gains at 1."""
    twin = FloatTwin(preset("tiny").model, torch.Generator().manual_seed(0))
    for lin, e in ((twin.proj, init_exponent(twin.proj.in_features)), (twin.head, init_exponent(twin.head.in_features)),
                   (twin.embed, 0)):
        assert float(lin.weight.detach().std()) == pytest.approx(2.0**e * math.sqrt(2 / 3), rel=0.05)
    assert torch.equal(twin.norm.weight, torch.ones_like(twin.norm.weight))


def test_twin_bad_inputs_raise():
    twin = FloatTwin(SMALL.model)
    with pytest.raises(ValueError, match="integer"):
        twin(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_context"):
        twin(torch.zeros(1, SMALL.model.max_context + 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="ModelConfig"):
        FloatTwin(SMALL)


def test_twin_step_lowers_the_loss(corpus):
    twin = FloatTwin(SMALL.model, torch.Generator().manual_seed(0))
    opt = make_optimizer(twin)
    batch = next(data.iterate_batches(corpus, 4, 16, 0))
    before = evaluate_twin(twin, [batch])
    for _ in range(5):
        twin_step(twin, opt, batch)
    assert evaluate_twin(twin, [batch]) < before - 0.5


def test_compare_small_run_gives_finite_curves(small_run):
    result, _ = small_run
    assert result["steps"] == 3 and result["curves"]["step"] == [0, 2, 3]
    for side in ("ternary", "float"):
        assert all(math.isfinite(v) and v > 0 for v in result["curves"][side])
    assert result["bpb_ternary"] == result["curves"]["ternary"][-1]
    assert result["ratio"] == pytest.approx(result["bpb_ternary"] / result["bpb_float"])
    assert result["curves"]["float"][-1] < result["curves"]["float"][0]  # the twin learns
    assert result["byte_path_weights"] == result["float_params"]
    assert 1.0 < result["bytes_per_weight"] < 2.0
    assert "3 steps" in format_table(result) and result["update"] == dataclasses.asdict(SMALL.update)


def test_compare_feeds_both_sides_the_same_seeded_batches(small_run, corpus):
    _, seen = small_run
    train_data, _ = data.split_corpus(corpus, SMALL.train.held_out_fraction)
    stream = data.iterate_batches(train_data, SMALL.train.batch_size, SMALL.train.context, SMALL.train.seed)
    assert [(s, i) for s, i, _ in seen] == [(s, i) for i in (1, 2, 3) for s in ("ternary", "float")]
    for i in range(3):
        expected = next(stream)
        assert torch.equal(seen[2 * i][2], expected) and torch.equal(seen[2 * i + 1][2], expected)


def test_write_outputs_png_and_json(small_run, tmp_path):
    png, js = write_outputs(small_run[0], tmp_path / "out")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert KEYS <= set(json.loads(js.read_text()))


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"eval_every": 0}, {"lr": -1.0}])
def test_compare_bad_arguments_raise(kwargs, corpus):
    with pytest.raises(ValueError):
        compare(SMALL, corpus, **kwargs)


def test_cli_compare_json(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(data.load_corpus()[:10240])  # one held-out batch: a quick evaluation
    rc = main(["compare", "--preset", "tiny", "--steps", "1", "--eval-every", "1", "--out", str(tmp_path / "o"),
               "--corpus", str(corpus), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result) and result["steps"] == 1 and result["curves"]["step"] == [0, 1]
    assert math.isfinite(result["bpb_ternary"]) and math.isfinite(result["bpb_float"])
    assert (tmp_path / "o" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "o" / "compare.json").read_text())["ratio"] == result["ratio"]
    assert result["update"]["counter_bits"] == 8 and result["update"]["flip_threshold"] == 16
    assert result["device"] == "cpu"


@pytest.mark.parametrize("device,message", [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"),
                                            *([] if torch.cuda.is_available() else [("cuda", "no CUDA device")])])
def test_cli_compare_bad_device_is_one_line(capsys, device, message):
    assert main(["compare", "--preset", "tiny", "--steps", "1", "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_compare_four_bit_counters(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(data.load_corpus()[:10240])
    args = ["compare", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "o"), "--corpus", str(corpus)]
    assert main([*args, "--counter-bits", "4", "--flip-threshold", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["update"]["counter_bits"] == 4 and result["update"]["flip_threshold"] == 5
    assert result["bytes_per_weight"] < 0.8 and math.isfinite(result["bpb_ternary"])
    assert "counter flips (4-bit counters), flip threshold 5" in format_table(result)
    assert main([*args, "--exp-threshold", "96", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["update"]["exp_threshold"] == 96
    assert main([*args, "--exp-threshold", "128"]) == 2
    assert "exp_threshold must be in 1..127" in capsys.readouterr().err
    assert main([*args, "--counter-bits", "4"]) == 2
    assert "flip_threshold must be at most 7" in capsys.readouterr().err
    assert main([*args, "--compute-dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ternary_compute_dtype"] == "bfloat16"
    assert main([*args, "--flip-mode", "stochastic", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["update"]["flip_mode"] == "stochastic" and result["bytes_per_weight"] < 0.35
    assert main([*args, "--flip-mode", "stochastic", "--flip-threshold", "300", "--flip-threshold-final", "4000",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    update = result["update"]
    assert (update["flip_threshold"], update["flip_threshold_final"], update["anneal_steps"]) == (300, 4000, 1)
    assert "flip threshold 300 annealed to 4000 over 1 steps" in format_table(result)
    assert main([*args, "--flip-mode", "stochastic", "--anneal-steps", "5"]) == 2
    assert "anneal_steps needs flip_threshold_final" in capsys.readouterr().err
    assert main([*args, "--flip-threshold-final", "64"]) == 2
    assert "counter mode has no schedule" in capsys.readouterr().err
