"""Byte-level tokens and the text data pipeline: vocabulary, encode/decode, corpus, batches.

Ids 0..255 are the bytes of UTF-8 text; ids 256..296 are the 41 special tokens of ``SPECIALS``, so
the vocabulary has 297 entries (SYSTEM.md, "Tokens"). The default corpus ships inside the package
(``arbfn/corpus/default.txt``, see the README there), so training never downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch

NUM_BYTES = 256
VOCAB_SIZE = 297

SPECIALS: tuple[str, ...] = (
    "pad", "bos", "eos",
    "image_start", "image_end", "audio_start", "audio_end", "video_start", "video_end",
    "vq", "route_text", "route_video", "route_audio", "route_image",
    "route_graph", "route_memory", "route_moe", "vq_start", "vq_end",
    "sep", "mask", "system", "user", "assistant", "turn_end",
    "think_start", "think_end", "tool_call", "tool_result", "doc_start", "doc_end",
    "graph_start", "graph_end", "memory_read", "memory_write", "frame", "halt", "noise",
    "reserved_0", "reserved_1", "reserved_2",
)  # fmt: skip

if len(SPECIALS) != VOCAB_SIZE - NUM_BYTES or len(set(SPECIALS)) != len(SPECIALS):
    raise RuntimeError(f"SPECIALS must be {VOCAB_SIZE - NUM_BYTES} unique names, got {len(SPECIALS)}")

_SPECIAL_INDEX: dict[str, int] = {name: i for i, name in enumerate(SPECIALS)}


def special_id(name: str) -> int:
    """Token id of a special by name (256 + its index in SPECIALS), so callers never hard-code ids."""
    try:
        return NUM_BYTES + _SPECIAL_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIALS)}") from None


PAD_ID = special_id("pad")
BOS_ID = special_id("bos")
EOS_ID = special_id("eos")


def _bytes_to_ids(data: bytes | bytearray) -> torch.Tensor:
    """Bytes as a 1-D int64 tensor of ids 0..255 (one vectorised copy, no per-byte Python loop)."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def encode(text: str | bytes) -> torch.Tensor:
    """Ids of the UTF-8 bytes of text (int64, 1-D): the model's input for any text."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
    return _bytes_to_ids(text)


def decode(ids: torch.Tensor | Iterable[int]) -> str:
    """Text of ids, dropping specials and replacing invalid UTF-8, so any model output is printable."""
    values = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    for i in values:
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
    return bytes(i for i in values if i < NUM_BYTES).decode("utf-8", errors="replace")


def load_corpus(path: str | Path | None = None) -> bytes:
    """Bytes of a text corpus; None gives the embedded default, which ships with the package."""
    if path is None:
        name = "embedded default corpus arbfn/corpus/default.txt"
        source = resources.files(__package__ or "arbfn") / "corpus" / "default.txt"
    else:
        name = f"corpus file {str(path)!r}"
        source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{name} does not exist or is not a file")
    data = source.read_bytes()
    if not data:
        raise ValueError(f"{name} is empty")
    return data


def split_corpus(data: bytes, held_out_fraction: float = 0.1) -> tuple[bytes, bytes]:
    """(train, held-out) with the held-out split the tail, so held-out bytes are never trained on."""
    if not (isinstance(held_out_fraction, (int, float)) and 0.0 < held_out_fraction < 1.0):
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    n_held = round(len(data) * held_out_fraction)
    if n_held < 1 or n_held >= len(data):
        raise ValueError(
            f"splitting {len(data)} bytes with held_out_fraction={held_out_fraction} "
            f"leaves an empty split ({len(data) - n_held} train, {n_held} held-out)"
        )
    cut = len(data) - n_held
    return bytes(data[:cut]), bytes(data[cut:])


def _as_ids(data: bytes | bytearray | torch.Tensor) -> torch.Tensor:
    """Data as a 1-D integer id tensor (bytes are encoded; tensors are checked, not copied)."""
    if isinstance(data, (bytes, bytearray)):
        return _bytes_to_ids(data)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be bytes or a torch.Tensor, got {type(data).__name__}")
    integer = not (data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool)
    if data.dim() != 1 or not integer:
        raise ValueError(f"data tensor must be 1-D integer ids, got shape {tuple(data.shape)} {data.dtype}")
    return data


def _check_sizes(n: int, batch_size: int, context: int) -> None:
    """Reject non-positive sizes and data too short for one window, with the numbers in the message."""
    if batch_size < 1 or context < 1:
        raise ValueError(f"batch_size and context must be >= 1, got batch_size={batch_size} context={context}")
    if n < context:
        raise ValueError(f"data has {n} tokens, shorter than context={context}")


def sample_batch(
    data: bytes | torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> torch.Tensor:
    """int64 [batch_size, context] windows at random offsets from generator: one training batch."""
    if not isinstance(data, (bytes, bytearray)):
        data = _as_ids(data)
    _check_sizes(len(data), batch_size, context)
    offsets = torch.randint(0, len(data) - context + 1, (batch_size,), generator=generator)
    if isinstance(data, (bytes, bytearray)):  # slice only the windows, not the whole corpus
        windows = b"".join(data[o : o + context] for o in offsets.tolist())
        return _bytes_to_ids(windows).view(batch_size, context)
    index = offsets[:, None] + torch.arange(context)[None, :]
    return data[index.to(data.device)].to(torch.int64)


def iterate_batches(
    data: bytes | torch.Tensor, batch_size: int, context: int, seed: int
) -> Iterator[torch.Tensor]:
    """Infinite stream of sample_batch batches from one seeded generator: reproducible training data."""
    ids = _as_ids(data)
    _check_sizes(ids.numel(), batch_size, context)  # here, not at the first next()
    generator = torch.Generator().manual_seed(seed)

    def stream() -> Iterator[torch.Tensor]:
        while True:
            yield sample_batch(ids, batch_size, context, generator)

    return stream()


def eval_batches(data: bytes | torch.Tensor, batch_size: int, context: int) -> list[torch.Tensor]:
    """Non-overlapping windows from the start, ragged tail dropped, in batches: held-out bits/byte."""
    ids = _as_ids(data)
    _check_sizes(ids.numel(), batch_size, context)
    n_windows = ids.numel() // context
    windows = ids[: n_windows * context].reshape(n_windows, context).to(torch.int64)
    return list(windows.split(batch_size))  # the last batch may hold fewer than batch_size windows


__all__ = [
    "NUM_BYTES", "VOCAB_SIZE", "SPECIALS", "special_id", "PAD_ID", "BOS_ID", "EOS_ID",
    "encode", "decode", "load_corpus", "split_corpus", "sample_batch", "iterate_batches", "eval_batches",
]  # fmt: skip
