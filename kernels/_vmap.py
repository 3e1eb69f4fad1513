"""vmap rules shared by ops whose first argument is an activation ``[..., features]``."""

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
        outs = []
        for i in range(info.batch_size):
            args = [a.select(d, i) if d is not None else a for a, d in zip((act, *rest), in_dims)]
            outs.append(op(*args))
        return torch.stack(outs), 0

    return rule
