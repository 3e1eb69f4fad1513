"""arbfn kernels: packed ternary ops (Triton on CUDA, pure-torch reference on CPU)."""
from kernels import packing, linear  # noqa: F401  (registers the ops)
