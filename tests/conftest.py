"""Shared fixtures: the tiny random SD-1.x-shaped model, built once per session (and fresh where a test mutates it)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """Shared and read-only: tests must leave its weights as they found them."""
    from sepen_core.models import build_tiny_model  # imported here: the service tests run without torch

    return build_tiny_model(seed=0)


@pytest.fixture
def fresh_tiny_model():
    from sepen_core.models import build_tiny_model

    return build_tiny_model(seed=0)
