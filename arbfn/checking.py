"""When data-dependent checks may run: they read values back to the host, which neither a ``torch.compile``
trace nor a CUDA graph capture (arbfn/graphed.py) can do, so both skip them."""

from __future__ import annotations

import torch


def checking_data() -> bool:
    """False while ``torch.compile`` traces or the current CUDA stream captures a graph, else True."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
