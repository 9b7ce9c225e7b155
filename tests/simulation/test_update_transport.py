"""`update-dtype = "float16"` end to end: the real ClientApp sends float16, the global model stays float32.

Two synthetic hospitals, two rounds through the real ServerApp loop and ClientApp in-process,
no DP (runs repeat exactly): the float16 run's model stays within float16 rounding of the
float32 run's, and every reply on the wire held float16 arrays.
"""

import numpy as np
import torch

from common.config import RunConfig
from server import checkpoint, runlog
from simulation.inprocess import run_inprocess

SETTINGS = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "dp-enabled": False,
            "min-available-sites": 2, "seed": 2}


def _run(hospitals, out, dtype, seen=None):
    cfg = RunConfig.from_mapping({**SETTINGS, "update-dtype": dtype, "data-root": str(hospitals),
                                  "state-root": str(out / "sites"), "out-dir": str(out)})

    def intercept(pid, request, reply):
        if seen is not None and request.metadata.message_type.startswith("train"):
            seen.extend(a.numpy().dtype for a in reply.content["arrays"].values())
        return reply

    run_inprocess(cfg, 2, intercept=intercept)
    return checkpoint.load(out / checkpoint.MODEL)["state_dict"], runlog.read(out / runlog.RUN_LOG)


def test_float16_updates_keep_the_float32_model(hospitals, tmp_path):
    seen = []
    half, half_log = _run(hospitals, tmp_path / "fp16", "float16", seen)
    full, full_log = _run(hospitals, tmp_path / "fp32", "float32")
    assert seen and all(d == np.float16 for d in seen)
    assert all(r["sites_ok"] == 2 and r["sites_rejected"] == 0 for r in half_log)
    for key, weights in full.items():
        assert half[key].dtype == torch.float32
        assert torch.allclose(half[key], weights, rtol=0, atol=2e-3), key
    assert abs(half_log[-1]["evaluate"]["loss"] - full_log[-1]["evaluate"]["loss"]) < 0.02
