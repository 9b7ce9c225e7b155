"""Shared fixtures: tiny synthetic hospitals written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data import synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share 2 cores with each other's subprocesses; keep torch to one thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hospitals(tmp_path_factory) -> Path:
    """Two small synthetic hospitals (site-000 MONOCHROME2, site-001 ...), seed 3."""
    root = tmp_path_factory.mktemp("hospitals")
    synthetic.write_hospitals(root, num_sites=2, seed=3, images_per_site=40)
    return root
