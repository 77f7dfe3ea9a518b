"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run of a script builds its own Accelerator; other tests may have set up a different one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
