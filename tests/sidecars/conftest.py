"""Tiny random sidecars (the real config classes) saved once per session to a temp folder, and loaded int8.
Tests that use them skip when the sidecars extra (transformers, diffusers, optimum-quanto) is missing."""

from pathlib import Path

import pytest

from sidecars import load_sidecars
from sidecars.tiny import TINY_IMAGE_SIZE, save_tiny_sidecars


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A sidecar_dir holding dinov2-small/, moonshine-base/ and pig-vae/ (tiny, float, save_pretrained)."""
    for module in ("transformers", "diffusers", "optimum.quanto"):
        pytest.importorskip(module, reason="the sidecars extra is not installed (pip install -e .[sidecars])")
    return save_tiny_sidecars(tmp_path_factory.mktemp("sidecars"))


@pytest.fixture(scope="session")
def loaded(tiny_dir) -> dict:
    """The three tiny sidecars through the real loaders, int8 (shared: tests must not modify them)."""
    return load_sidecars(tiny_dir, ("image", "audio", "video"), image_size=TINY_IMAGE_SIZE)
