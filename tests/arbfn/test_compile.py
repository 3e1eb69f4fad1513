"""torch.compile(fullgraph=True) of the whole model forward (fixed-step halting loops)."""

import pytest
import torch
from torch._dynamo.utils import counters

from arbfn.config import preset
from arbfn.model import forward, init_model


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_forward_compiles_fullgraph_and_equals_eager(fresh_dynamo):
    state = init_model(preset("tiny"), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 256, (2, 24), generator=g)  # 48 tokens <= moe.dense_limit: the dense MoE path
    assert batch.numel() <= state.config.moe.dense_limit
    compiled = torch.compile(lambda s, b: forward(s, b, fixed_loops=True), fullgraph=True)
    with torch.no_grad():
        for x in (batch, torch.randint(0, 256, (2, 24), generator=g)):  # the second call reuses the graph
            got, want = compiled(state, x), forward(state, x, fixed_loops=True)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(got.router, want.router, atol=1e-4, rtol=0)
            torch.testing.assert_close(got.aux["vq_indices"], want.aux["vq_indices"])
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
