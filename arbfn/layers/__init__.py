"""Layers as ``init_<layer>(..., generator) -> params`` / ``<layer>(params, inputs, ...) -> outputs`` pairs.

Conventions every layer here follows:

- ``params`` is a dict tree of :class:`arbfn.ternary.TernaryWeight` and integer tensors (int8/int16/
  int32 counters, edge lists); never a float tensor. ``generator=None`` builds the same tree shape-only
  on the meta device, so large presets are counted without allocating.
- Ternary weights are used only through ``arbfn.ternary`` (``linear``, ``embed``, ``decode``) or ops
  from ``kernels``; any ternary weight anywhere in the tree is trained by the train step
  automatically (through its probe).
- The apply function never mutates its inputs. Integer counters that learn from what the forward saw
  (VQ usage, graph edge scores, memory strength) are updated by a separate pure function
  ``update_<layer>_counters(params, aux) -> params`` from the ``aux`` the forward returned.
- Halting loops are a step function plus ``arbfn.loops.act_eager`` / ``act_fixed``.
- Bad inputs raise ``ValueError``/``TypeError`` naming the problem; data-dependent checks are skipped
  while tracing or capturing a CUDA graph (``arbfn.checking.checking_data()``).
"""
