"""`fedhosp simulate --ray-address`: the same simulation on an existing Ray cluster, its sites spread
over the cluster's nodes, its results back on the driver, and nothing left once the cluster is stopped.

The cluster is two Ray nodes on this machine (ray.cluster_utils.Cluster: a head and a second node,
each its own raylet, object store and ports), one CPU each: one site trains on each node at a time,
so six sites must use both. The data and the output folder are on a path both nodes see (here:
the same disk), as on a real cluster (docs/simulation.md).
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from common import process_tree
from simulation.grid import RAY_NODES
from tests import leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SITES, ROUNDS = 6, 2
RAY_EXIT_S = 30.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ray.cluster_utils import Cluster

    out = tmp_path_factory.mktemp("cluster-run")
    marker = f"cluster-{uuid.uuid4().hex}"
    os.environ[leftovers.MARKER], session = marker, os.environ.get(leftovers.MARKER)  # the nodes carry it too
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        nodes = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "fedhosp", "simulate", "--ray-address", cluster.address,
                 "--sites", str(SITES), "--rounds", str(ROUNDS), "--images-per-site", "20", "--no-dp",
                 "--out", str(out), "--run-config", "image-size=16 local-epochs=1"],
                capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""},
            )
        finally:
            cluster.shutdown()
    finally:
        if session is not None:
            os.environ[leftovers.MARKER] = session
    ours = [p for p in leftovers.marked(marker) if any(n in leftovers.command(p) for n in leftovers.NAMES)]
    left = [leftovers.command(p) for p in process_tree.wait_gone(ours, RAY_EXIT_S)]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, nodes, left


def test_the_sites_ran_on_both_nodes_of_the_cluster(run):
    out, _, nodes, _ = run
    placed = json.loads((out / RAY_NODES).read_text())
    assert sorted(placed) == [f"site-{i:03d}" for i in range(SITES)]
    assert {p["node"] for p in placed.values()} == nodes and len(nodes) == 2
    assert all(p["gpus"] == [] for p in placed.values())  # no GPU asked for, none given


def test_results_come_back_to_the_driver(run):
    out, proc, _, _ = run
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["sites_ok"] == SITES for r in results["rounds"])
    assert results["engine"]["ray-nodes-used"] == 2 and results["engine"]["concurrent-sites"] == 2
    assert proc.stdout.strip().splitlines()[-1] == f"results: {out / 'results.json'}"


def test_no_ray_process_is_left_once_the_cluster_is_stopped(run):
    assert not run[3]
