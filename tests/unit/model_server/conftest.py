"""Fixtures of the model server's unit tests."""

from __future__ import annotations

import pytest

from tests.unit.model_server.model_artifacts import MemorySource


@pytest.fixture
def source() -> MemorySource:
    """An empty in-memory artifact source."""
    return MemorySource()
