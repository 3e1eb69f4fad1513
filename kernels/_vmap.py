"""vmap helpers shared by the ops: the activation-folding rule, the per-sample fallback, and when
data-dependent input checks may run."""

from __future__ import annotations

from typing import Callable

import torch


def activation_vmap_rule(op: Callable) -> Callable:
    """A ``register_vmap`` rule for ``op(act, *weights, *ints)``.

    A batched activation folds into the op's free leading dims (one launch); batched weights (per-sample
    weights, rare) fall back to one launch per sample.
    """

    def rule(info, in_dims, act, *rest):
        act_dim, weight_dims = in_dims[0], in_dims[1:]
        if all(d is None for d in weight_dims):
            return op(act.movedim(act_dim, 0), *rest), 0
        return torch.stack(per_sample(op, info.batch_size, in_dims, (act, *rest))), 0

    return rule


def per_sample(op: Callable, batch_size: int, in_dims, args) -> list:
    """The vmap fallback: ``op`` once per sample, selecting sample ``i`` of every batched argument."""
    return [op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]) for i in range(batch_size)]


def data_checkable(*tensors: torch.Tensor) -> bool:
    """Whether data-dependent input checks can run: not while tracing, nor on tensors batched by vmap."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not torch.compiler.is_compiling() and not any(wrapped(t) for t in tensors)
