"""Server tests talk to in-memory grids: Flower stamps every message with the running task's ids."""

import pytest

from simulation.inprocess import _identity


@pytest.fixture(autouse=True)
def _task_identity():
    """Outside an engine, play the engine's part: run 1, the server as node 0."""
    with _identity(1, 0):
        yield
