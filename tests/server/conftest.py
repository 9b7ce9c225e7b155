"""Server tests talk to in-memory grids: Flower stamps every message with the running task's ids."""

import pytest

from common.flower_compat.engine import acting_as


@pytest.fixture(autouse=True)
def _taskacting_as():
    """Outside an engine, play the engine's part: run 1, the server as node 0."""
    with acting_as(1, 0):
        yield
