"""Shared fixtures; what they build comes from tests/builders.py."""

from __future__ import annotations

import pytest

import builders


@pytest.fixture
def mlp_bundle(tmp_path):
    """A 2-segment MLP bundle (x[N,16] -> h[N,32] -> y[N,4]) with a dynamic batch dim."""
    return builders.gemm_mlp_bundle(tmp_path / "mlp.bundle")
