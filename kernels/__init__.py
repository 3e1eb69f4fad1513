"""arbfn kernels: packed ternary ops, each a Triton kernel (CUDA) and a pure-torch reference (CPU).

This package imports only torch and triton; it never imports arbfn or sidecars.

The op pattern (chosen after probing torch 2.13 CPU and kept working on the GPU image's torch 2.11):

1. Every kernel launch sits inside a ``torch.library.custom_op``. Its default implementation is the
   pure-torch reference (CPU, and the oracle of the tests); ``register_kernel("cuda")`` launches the
   Triton kernel. Each op has ``register_fake`` (so compile/export/AOTInductor trace through it) and,
   where a batch dimension makes sense, ``register_vmap``. No op has ``register_autograd``: on torch
   2.13 that path fails under ``torch.func.grad`` ("must override the setup_context staticmethod").
2. Differentiable ops are split-style ``torch.autograd.Function``s (``forward`` without ctx,
   ``setup_context``, ``backward``, ``generate_vmap_rule = True``) whose forward and backward call only
   ops. The backward runs its ops under ``torch.no_grad()``: without it, a custom op called inside a
   backward under ``torch.func.grad`` goes through the op's generated autograd wrapper and fails the
   same way. (So double backward is not supported; nothing here needs it.)
3. Weight gradients arrive through a *probe*: a zero float tensor passed as an extra argument (an
   expanded 0-stride scalar, so it costs no memory until autograd writes its gradient ``dL/dW``).

Paths tested (tests/kernels/test_op_paths.py): eager autograd; ``torch.func.grad`` /
``grad_and_value`` over pytrees; ``torch.func.vmap`` including per-sample gradients;
``torch.compile(fullgraph=True)`` forward + backward with gradients taken by ``torch.autograd.grad``
outside the compiled function; ``torch.export``; AOTInductor packages loaded in a fresh process
(import ``kernels`` first: the package refers to the ops by name).

Known not to work on torch 2.13 (pinned by tests so a fix is noticed): ``torch.func.grad(torch.compile(f))``
raises ``Unsupported`` (pytorch#128711), and ``torch.compile(torch.func.grad(f))`` silently returns a
zero probe gradient (the custom backward is dropped; cf. pytorch#193279). A compiled train step must
therefore compile the loss and take gradients with ``torch.autograd.grad`` outside it.
``torch.library.triton_op`` is not used: it breaks ``torch.compile`` on CPU ("0 active drivers").

Ops: ``arbfn::pack``, ``arbfn::unpack`` (packing.py); ``arbfn::linear_fwd``, ``arbfn::linear_bwd_x``
(linear.py); ``arbfn::embedding_fwd`` (embedding.py); ``arbfn::ternary_update``, ``arbfn::ternary_update_nibble``, ``arbfn::ternary_update_stochastic`` (update.py); ``arbfn::ternary_update_group`` (update_group.py: a list of weights in one op); ``arbfn::ternary_update_chain``
(update_chain.py: chain flips, a place bit per weight; reference only, no Triton kernel yet); ``arbfn::rmsnorm_fwd``, ``arbfn::rmsnorm_bwd`` (rmsnorm.py); ``arbfn::add_rmsnorm_fwd``, ``arbfn::add_rmsnorm_bwd`` (add_rmsnorm.py: the residual add fused in); ``arbfn::route_combine``, ``arbfn::route_combine_bwd_expert``, ``arbfn::route_combine_bwd_weights`` (moe.py); ``arbfn::edge_aggregate``, ``arbfn::edge_aggregate_bwd``, ``arbfn::gather_residual`` (graph.py); ``arbfn::denoise_fwd``, ``arbfn::denoise_bwd`` (denoise.py).
"""

from kernels import (add_rmsnorm, denoise, embedding, graph, linear, moe, packing, rmsnorm, update,  # noqa: F401
                     update_chain, update_group)  # (importing registers the ops)
