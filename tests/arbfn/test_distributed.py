"""Tests of arbfn.distributed: 2 gloo ranks on CPU keep bit-identical state equal to a one-process reference,
rank 0 alone checkpoints, resume works across world sizes, a dead or silent peer fails fast, and the CLI.

The ranks are this file run as a script (``python test_distributed.py MODE ...``) with torchrun's
environment variables set by hand, so that each rank is an independent process (torchrun's agent would
kill the survivors itself and hide whether the ranks fail on their own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from arbfn import checkpoint, data
from arbfn import distributed as D
from arbfn.config import UpdateConfig, preset
from arbfn.model import init_model
from arbfn.ternary import weights
from arbfn.train import finish_step, gradient_signals, train_step

WORLD, BATCH, CONTEXT, STEPS = 2, 4, 16, 3
CFG = dataclasses.replace(preset("tiny"), update=UpdateConfig(flip_threshold=2, exp_threshold=3),
                          train=dataclasses.replace(preset("tiny").train, batch_size=BATCH, context=CONTEXT))


def batches(n: int) -> list[torch.Tensor]:
    """The first ``n`` global batches every rank and the reference draw."""
    stream = data.iterate_batches(data.load_corpus(), BATCH, CONTEXT, 0)
    return [next(stream) for _ in range(n)]


def tensors(state) -> dict[str, torch.Tensor]:
    return {pytree.keystr(p): t for p, t in pytree.tree_flatten_with_path(state)[0] if isinstance(t, torch.Tensor)}


# ---------------------------------------------------------------- the ranks (this file as a script)


def _record_collectives(log: list) -> None:
    """Wrap the collectives arbfn.distributed calls so that each call's name and input bytes land in ``log``."""
    for name in ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "all_reduce"):
        if hasattr(dist, name):
            def wrapped(*args, _f=getattr(dist, name), _n=name, **kw):
                inp = args[0] if _n == "all_reduce" else args[1]
                log.append([_n, inp.numel(), inp.element_size()])
                return _f(*args, **kw)
            setattr(dist, name, wrapped)


def _rank_steps(ckpt: str, out: str) -> None:
    """STEPS data-parallel steps per exchange from ``ckpt``; digests, metrics and collective sizes to rank<r>.json;
    the trits run's final state checkpointed (rank 0 must be the only writer: each save call is logged)."""
    real_save = checkpoint.save

    def logged_save(*args, **kwargs):
        Path(out, f"saved-by-{D.rank()}").touch()
        return real_save(*args, **kwargs)

    checkpoint.save = logged_save
    log: list = []
    _record_collectives(log)
    report: dict = {}
    final = {}
    for exchange in D.EXCHANGES:
        state, cfg = checkpoint.load_run(ckpt)
        digests, metrics = [], []
        for b in batches(STEPS):
            del log[:]
            state, m = D.data_parallel_step(state, b, cfg, exchange)
            digests.append(D.state_digest(state))
            metrics.append({k: float(v) for k, v in m.items()})
        report[exchange] = {"digests": digests, "metrics": metrics}
        report[exchange + "_step_collectives"] = list(log)
        final[exchange] = state
    D.save_checkpoint(final["trits"], Path(out, "dp.safetensors"), cfg)
    Path(out, f"rank{D.rank()}.json").write_text(json.dumps(report))


def _rank_fails(mode: str) -> None:
    """One step together, then rank 1 dies (``die``) or goes silent (``hang``) while rank 0 steps again."""
    state = init_model(CFG, torch.Generator().manual_seed(0))
    b = batches(1)[0]
    state, _ = D.data_parallel_step(state, b, CFG)
    if D.rank() == 1:
        if mode == "die":
            os._exit(17)
        time.sleep(120)
    D.data_parallel_step(state, b, CFG)
    print("rank 0 stepped without its peer", flush=True)


def _rank_main(argv: list[str]) -> None:
    D.init("cpu", timeout_s=float(argv[1]))
    if argv[0] == "steps":
        _rank_steps(argv[2], argv[3])
    else:
        _rank_fails(argv[0])
    D.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*argv: str) -> list[subprocess.Popen]:
    """WORLD rank processes running this file with ``argv``, wired up as torchrun would."""
    port = str(_free_port())
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(WORLD),
               "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for every rank (killing them after ``timeout_s``); each must exit 0."""
    try:
        errs = [p.communicate(timeout=timeout_s)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]


@contextlib.contextmanager
def one_thread():
    """The ranks run with one thread each; so does the reference (CPU float sums may depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- 2 ranks, several steps


def reference_step(state, batch, cfg):
    """What a WORLD-rank step must equal: every shard's gradient signs summed, evidence concatenated in shard order,
    scalar terms averaged, then one finish_step."""
    per = batch.shape[0] // WORLD
    outs = [gradient_signals(state, batch[r * per:(r + 1) * per], cfg.train) for r in range(WORLD)]
    votes = pytree.tree_map(lambda *gs: None if gs[0] is None else sum(torch.sign(g) for g in gs),
                            *[o[0] for o in outs])
    loss = torch.stack([o[1] for o in outs]).mean()
    aux = {k: torch.cat([o[2][k] for o in outs]) if v.dim() else torch.stack([o[2][k] for o in outs]).mean()
           for k, v in outs[0][2].items()}
    return finish_step(state, votes, loss, aux, cfg)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """A 1-process checkpoint (one train_step), resumed on 2 ranks for STEPS steps per exchange: (dir, reports, start)."""
    d = tmp_path_factory.mktemp("dp")
    start = init_model(CFG, torch.Generator().manual_seed(0))
    start, _ = train_step(start, batches(1)[0], CFG)
    checkpoint.save(start, d / "start.safetensors", CFG)
    finish(launch("steps", "60", str(d / "start.safetensors"), str(d)), timeout_s=240)
    return d, [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)], start


def test_every_rank_holds_the_same_state_after_every_step(ranks):
    _, reports, _ = ranks
    for exchange in D.EXCHANGES:
        digests = [r[exchange]["digests"] for r in reports]
        assert digests[0] == digests[1], exchange
        assert len(set(digests[0])) == STEPS, "the state must change every step"
    flips = sum(m["flips"] for m in reports[0]["trits"]["metrics"])
    assert flips > 0, "low thresholds: trits must flip within the run"


def test_trits_and_int8_exchanges_give_the_same_states(ranks):
    _, reports, _ = ranks
    assert reports[0]["trits"]["digests"] == reports[0]["int8"]["digests"]


def test_two_rank_steps_equal_the_one_process_reference(ranks):
    d, reports, start = ranks
    state = start
    with one_thread():
        for i, b in enumerate(batches(STEPS)):
            state, m = reference_step(state, b, CFG)
            assert D.state_digest(state) == reports[0]["trits"]["digests"][i], f"step {i + 1}"
            for k, v in m.items():  # logged metrics: the ranks' mean of their shards' terms
                assert abs(reports[1]["trits"]["metrics"][i][k] - float(v)) <= 1e-5 * max(1.0, abs(float(v))), k
    saved = checkpoint.load(d / "dp.safetensors")  # independent of state_digest: tensor by tensor
    a, b = tensors(saved), tensors(state)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_written_by_rank_0_alone_atomically(ranks):
    d, reports, _ = ranks
    assert sorted(p.name for p in d.glob("saved-by-*")) == ["saved-by-0"]
    assert not list(d.glob("*.tmp")), "no temporary file may be left behind"
    state, cfg = checkpoint.load_run(d / "dp.safetensors")
    assert cfg == CFG and int(state.step) == 1 + STEPS
    assert D.state_digest(state) == reports[0]["trits"]["digests"][-1]


def test_resume_the_two_rank_checkpoint_on_one_process(ranks):
    d, _, _ = ranks
    state, cfg = checkpoint.load_run(d / "dp.safetensors")
    b = batches(STEPS + 1)[-1]
    new, m = D.data_parallel_step(state, b, cfg)  # no process group: a world of one
    assert int(new.step) == 2 + STEPS and D.state_digest(new) != D.state_digest(state)
    ref, _ = train_step(state, b, cfg)
    assert D.state_digest(new) == D.state_digest(ref)


def test_wire_bytes_match_what_the_exchange_sends(ranks):
    """The formula, applied to the tensors a step actually passed: a rank sends (W-1)/W of its input in a pairwise
    all_to_all, W-1 inputs in a ring all_gather, 2(W-1) chunks of ceil(n/W) elements in a ring all_reduce."""
    _, reports, start = ranks
    votes = sum(w.num_weights for w in weights(start.params) if w.trainable)
    sent = {"all_to_all_single": lambda n, es: n * es * (WORLD - 1) // WORLD,
            "all_reduce": lambda n, es: 2 * (WORLD - 1) * -(-n // WORLD) * es}
    for exchange in D.EXCHANGES:
        calls = reports[0][exchange + "_step_collectives"]
        total = sum(sent.get(name, lambda n, es: (WORLD - 1) * n * es)(n, es) for name, n, es in calls)
        scalars = len(reports[0][exchange]["metrics"][0]) - 2  # loss and its terms are averaged, not flips/exp_moves
        parts = D.wire_bytes(WORLD, votes, exchange, num_evidence=2 * BATCH // WORLD * CONTEXT, num_scalars=scalars)
        assert total == sum(parts.values()), (exchange, calls, parts)
    fp32 = D.wire_bytes(WORLD, votes, "fp32")["votes"]
    assert fp32 / D.wire_bytes(WORLD, votes, "trits")["votes"] >= 16
    assert fp32 / D.wire_bytes(WORLD, votes, "int8")["votes"] == 4


# ---------------------------------------------------------------- failures


def _fail(mode: str, timeout_s: float, within_s: float) -> None:
    procs = launch(mode, str(timeout_s))
    try:
        _, err = procs[0].communicate(timeout=within_s)  # a hang raises TimeoutExpired: the test fails
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode not in (0, None), "rank 0 must fail without its peer"
    assert "PeerFailure" in err and "a peer rank died or did not answer" in err, err[-3000:]


def test_a_dead_rank_makes_the_other_fail_with_a_clear_error():
    _fail("die", timeout_s=60, within_s=45)  # fails on the broken connection, long before the timeout


def test_a_silent_rank_makes_the_other_fail_after_the_timeout():
    _fail("hang", timeout_s=3, within_s=40)


# ---------------------------------------------------------------- pure parts


def test_one_rank_step_equals_train_step():
    state = init_model(CFG, torch.Generator().manual_seed(0))
    b = batches(1)[0]
    a, ma = D.data_parallel_step(state, b, CFG)
    r, mr = train_step(state, b, CFG)
    ta, tr = tensors(a), tensors(r)
    assert all(torch.equal(ta[k], tr[k]) for k in tr) and ma.keys() == mr.keys()
    assert all(torch.equal(ma[k], mr[k]) for k in mr)


def test_state_digest_sees_every_byte():
    state = init_model(CFG, torch.Generator().manual_seed(0))
    usage = state.params["vq"]["usage"]
    bumped = dataclasses.replace(state, params={**state.params, "vq": {**state.params["vq"], "usage": usage + 1}})
    assert D.state_digest(state) == D.state_digest(init_model(CFG, torch.Generator().manual_seed(0)))
    assert D.state_digest(bumped) != D.state_digest(state)


def test_bad_input():
    ids = batches(1)[0]
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        D.shard(ids, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        D.shard(ids, 2, 2)
    assert torch.equal(D.shard(ids, 1, 2)["bytes"], ids[2:])
    with pytest.raises(ValueError, match="exchange"):
        D.step_function("fp16")
    with pytest.raises(ValueError, match="exchange"):
        D.wire_bytes(2, 10, "bf16")
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init()
    with pytest.raises(ValueError, match="nproc"):
        D.relaunch("arbfn.cli", [], 0)


# ---------------------------------------------------------------- the command line


def test_cli_train_nproc_2_then_resume_on_one_process(tmp_path, capsys):
    from arbfn.cli import main

    out = tmp_path / "run"
    cmd = ["arbfn", "train", "--nproc", "2", "--steps", "3", "--batch-size", "4", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 ranks)" in r.stdout and r.stdout.count("wrote ") == 1, "rank 0 alone reports"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert int(state.step) == 3 and cfg.train.batch_size == 4
    ref = init_model(cfg, torch.Generator().manual_seed(cfg.train.seed))  # the ranks trained shards of train()'s stream
    stream = data.iterate_batches(data.split_corpus(data.load_corpus(), cfg.train.held_out_fraction)[0],
                                  cfg.train.batch_size, cfg.train.context, cfg.train.seed)
    with one_thread():
        for _ in range(3):
            ref, _ = reference_step(ref, next(stream), cfg)
    assert D.state_digest(state) == D.state_digest(ref)
    assert main(["train", "--resume", str(out / "checkpoint.safetensors"), "--nproc", "1", "--steps", "1",
                 "--out", str(tmp_path / "more"), "--quiet"]) == 0
    assert int(checkpoint.load(tmp_path / "more" / "checkpoint.safetensors").step) == 4


def test_cli_trains_chain_flips_on_2_ranks_with_the_fp32_exchange(tmp_path):
    """The ranks sum their fp32 gradients, so every rank takes the same chain step: the run checks that the replicas
    agree before rank 0 writes the checkpoint, which holds a chain state whose places moved."""
    out = tmp_path / "run"
    cmd = ["arbfn", "train", "--nproc", "2", "--steps", "2", "--batch-size", "4", "--flip-mode", "chain",
           "--group-size", "64", "--fixed-norm-gains", "--flip-threshold", "1", "--exchange", "fp32", "--out",
           str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state, cfg = checkpoint.load_run(out / "checkpoint.safetensors")
    assert int(state.step) == 2 and cfg.update.flip_mode == "chain" and cfg.update.fixed_norm_gains
    fresh = init_model(cfg, torch.Generator().manual_seed(cfg.train.seed))
    assert sum(int((a.t_accum != b.t_accum).sum()) for a, b in zip(weights(state.params), weights(fresh.params))
               if a.t_accum is not None) > 0  # the places moved


def test_cli_bad_nproc_and_batch(tmp_path, capsys, monkeypatch):
    from arbfn.cli import main

    base = ["train", "--steps", "1", "--out", str(tmp_path / "x"), "--quiet"]
    assert main([*base, "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert main([*base, "--nproc", "2", "--batch-size", "3"]) == 2
    assert "batch size 3 must be a positive multiple of the world size 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main([*base, "--nproc", "2"]) == 2
    assert "disagrees" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
