"""Simulation only: each virtual site's DP secret derived from the run's seed, so DP runs repeat.

A real site seeds its Poisson sampling and DP noise with a secret it creates once, at random,
and never sends (client/site.py): were the noise derivable from the server's seed, the server
could subtract it. In a simulation one researcher plays server and every site alike, so
nothing is lost by deriving each site's secret from (seed, partition id): the same seed then
gives the same noise, and the same results. This module writes the file the site reads
before the engine starts; the real site's code path is unchanged (it still creates a random
secret wherever none exists). `fedhosp simulate --random-site-secrets` keeps the real behaviour.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from client.site import SECRET_FILE
from common.config import RunConfig

DOMAIN = b"fedhosp simulation site secret v1"


def derived(seed: int, partition_id: int) -> bytes:
    return hmac.new(DOMAIN, f"{seed}:{partition_id}".encode(), hashlib.sha256).digest()


def write(cfg: RunConfig, sites: int) -> None:
    """Put the derived secret in every virtual site's state folder (mode 0600, atomically)."""
    for pid in range(sites):
        folder = Path(cfg.site_state_dir(pid))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SECRET_FILE
        secret = derived(cfg.seed, pid)
        if path.is_file() and path.read_bytes() == secret:
            continue
        tmp = folder / f".{SECRET_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        os.replace(tmp, path)
