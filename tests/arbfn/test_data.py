"""Tests of arbfn.data: vocabulary, encode/decode, the embedded corpus, splits and batches."""

import string

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arbfn.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    VOCAB_SIZE,
    decode,
    encode,
    eval_batches,
    iterate_batches,
    load_corpus,
    sample_batch,
    special_id,
    split_corpus,
)

DATA = bytes(range(256)) * 4 + b"the quick brown fox jumps over the lazy dog" * 10


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return load_corpus()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- vocabulary -------------------------------------------------------------------------------


def test_vocab_is_297_with_41_unique_specials():
    assert VOCAB_SIZE == 297
    assert len(SPECIALS) == 41 and len(set(SPECIALS)) == 41
    ids = [special_id(name) for name in SPECIALS]
    assert ids == list(range(256, 297))
    assert (PAD_ID, BOS_ID, EOS_ID) == (special_id("pad"), special_id("bos"), special_id("eos"))
    assert SPECIALS[:3] == ("pad", "bos", "eos")


def test_unknown_special_is_a_clear_key_error():
    with pytest.raises(KeyError, match="no_such_token"):
        special_id("no_such_token")


# --- encode / decode --------------------------------------------------------------------------


@given(st.text())
def test_text_round_trip(text):
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert decode(ids) == text


@given(st.binary(), st.lists(st.integers(256, 296), max_size=5), st.data())
def test_bytes_round_trip_and_specials_dropped(raw, specials, data):
    ids = encode(raw).tolist()
    for s in specials:
        ids.insert(data.draw(st.integers(0, len(ids))), s)
    assert decode(ids) == raw.decode("utf-8", errors="replace")
    assert decode(torch.tensor(ids, dtype=torch.int64)) == decode(ids)


def test_invalid_utf8_is_replaced():
    assert decode([0x66, 0xFF, 0x6F]) == "f\ufffdo"


@pytest.mark.parametrize("bad", [-1, 297, 1000])
def test_bad_ids_rejected(bad):
    with pytest.raises(ValueError, match=str(bad)):
        decode([65, bad, 66])
    with pytest.raises(ValueError, match=str(bad)):
        decode(torch.tensor([65, bad]))


def test_encode_rejects_other_types():
    with pytest.raises(TypeError):
        encode(123)  # type: ignore[arg-type]


# --- corpus -----------------------------------------------------------------------------------


def test_default_corpus_is_nontrivial_printable_text(corpus):
    assert len(corpus) > 100_000
    text = corpus.decode("utf-8")  # strict: the file is valid UTF-8
    assert "Python Software Foundation License" in text.splitlines()[0]
    printable = sum(c in string.printable for c in text)
    assert printable / len(text) > 0.99
    assert load_corpus() == corpus  # deterministic: it is a file


def test_load_corpus_from_path(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"hello corpus")
    assert load_corpus(path) == b"hello corpus"
    assert load_corpus(str(path)) == b"hello corpus"


def test_load_corpus_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)


# --- split ------------------------------------------------------------------------------------


@given(st.binary(min_size=2, max_size=500), st.floats(0.01, 0.99))
def test_split_is_train_then_tail(data, fraction):
    n_held = round(len(data) * fraction)
    if not 1 <= n_held < len(data):
        with pytest.raises(ValueError):
            split_corpus(data, fraction)
        return
    train, held = split_corpus(data, fraction)
    assert train + held == data
    assert len(held) == n_held and train and held
    assert data.endswith(held)


def test_split_default_corpus(corpus):
    train, held = split_corpus(corpus)
    assert train + held == corpus
    assert abs(len(held) - 0.1 * len(corpus)) <= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_corpus(DATA, fraction)


def test_split_rejects_empty_split():
    with pytest.raises(ValueError, match="empty split"):
        split_corpus(b"x", 0.5)
    with pytest.raises(ValueError, match="empty split"):
        split_corpus(b"abcdefghij", 0.01)


# --- sample_batch / iterate_batches -----------------------------------------------------------


def test_sample_batch_shape_dtype_and_windows_are_substrings():
    batch = sample_batch(DATA, 8, 32, gen(0))
    assert batch.shape == (8, 32) and batch.dtype == torch.int64
    for row in batch.tolist():
        assert bytes(row) in DATA


def test_sample_batch_deterministic_per_seed():
    a = sample_batch(DATA, 8, 32, gen(1))
    assert torch.equal(a, sample_batch(DATA, 8, 32, gen(1)))
    assert not torch.equal(a, sample_batch(DATA, 8, 32, gen(2)))
    assert torch.equal(a, sample_batch(encode(DATA), 8, 32, gen(1)))  # bytes and ids agree


def test_sample_batch_window_equal_to_data():
    batch = sample_batch(b"abcd", 3, 4, gen(0))
    assert batch.tolist() == [list(b"abcd")] * 3


@pytest.mark.parametrize(
    ("batch_size", "context", "match"), [(0, 4, "batch_size"), (2, 0, "context"), (2, 5, "shorter")]
)
def test_sample_batch_bad_sizes(batch_size, context, match):
    with pytest.raises(ValueError, match=match):
        sample_batch(b"abcd", batch_size, context, gen(0))


def test_sample_batch_rejects_non_1d_or_float_tensor():
    with pytest.raises(ValueError, match="1-D integer"):
        sample_batch(torch.zeros(2, 8, dtype=torch.int64), 1, 4, gen(0))
    with pytest.raises(ValueError, match="1-D integer"):
        sample_batch(torch.zeros(8), 1, 4, gen(0))


def test_iterate_batches_is_a_deterministic_stream():
    stream = iterate_batches(DATA, 4, 16, seed=7)
    first = [next(stream) for _ in range(5)]
    again = iterate_batches(DATA, 4, 16, seed=7)
    for batch in first:
        assert torch.equal(batch, next(again))
    assert not all(torch.equal(a, b) for a, b in zip(first, first[1:]))  # the stream moves on
    other = iterate_batches(DATA, 4, 16, seed=8)
    assert not torch.equal(first[0], next(other))
    # the stream equals sample_batch calls on one generator seeded the same way
    g = gen(7)
    for batch in first:
        assert torch.equal(batch, sample_batch(DATA, 4, 16, g))


def test_iterate_batches_validates_eagerly():
    with pytest.raises(ValueError, match="shorter"):
        iterate_batches(b"abc", 1, 4, seed=0)


# --- eval_batches -----------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=400), st.integers(1, 9), st.integers(1, 40))
def test_eval_batches_cover_without_overlap(data, batch_size, context):
    if len(data) < context:
        with pytest.raises(ValueError, match="shorter"):
            eval_batches(data, batch_size, context)
        return
    batches = eval_batches(data, batch_size, context)
    n_windows = len(data) // context
    assert [b.shape[0] for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 1 <= batches[-1].shape[0] <= batch_size
    windows = torch.cat(batches)
    assert windows.shape == (n_windows, context) and windows.dtype == torch.int64
    assert bytes(windows.flatten().tolist()) == data[: n_windows * context]  # consecutive, no overlap, no gap
    assert all(torch.equal(a, b) for a, b in zip(batches, eval_batches(data, batch_size, context)))


def test_eval_batches_on_held_out_split(corpus):
    _, held = split_corpus(corpus)
    batches = eval_batches(held, 16, 256)
    windows = torch.cat(batches)
    assert windows.shape == (len(held) // 256, 256)
    assert len(held) - windows.numel() < 256  # only the ragged tail is dropped


def test_eval_batches_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(DATA, 0, 8)
    with pytest.raises(ValueError, match="context"):
        eval_batches(DATA, 2, 0)
