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

from common.config import RunConfig
from common.site_state import SECRET_FILE, SiteState

DOMAIN = b"fedhosp simulation site secret v1"


def derived(seed: int, partition_id: int) -> bytes:
    return hmac.new(DOMAIN, f"{seed}:{partition_id}".encode(), hashlib.sha256).digest()


def write(cfg: RunConfig, sites: int) -> None:
    """Put the derived secret in every virtual site's state folder (mode 0600, atomically)."""
    for pid in range(sites):
        state = SiteState(cfg.site_state_dir(pid))
        secret = derived(cfg.seed, pid)
        if state.read_bytes(SECRET_FILE) != secret:
            state.write_bytes(SECRET_FILE, secret)
