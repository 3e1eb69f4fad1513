"""Layers as ``init_<layer>(..., generator) -> params`` / ``<layer>(params, inputs) -> outputs`` pairs."""
