"""A stand-in for Flower's `flwr-clientapp` entry point: reports what process it runs in."""

import json
import os
import sys
import time

import numpy as np


def main() -> int:
    args = sys.argv[1:]
    report = {
        "argv": args, "cwd": os.getcwd(), "pid": os.getpid(), "env": os.environ.get("WARM_MARK"),
        "zygote_module_loaded": "fedhosp.warm_clientapp" in sys.modules,
        "numpy_preloaded": "numpy" in sys.modules, "draw": float(np.random.random()),
    }
    with open(os.environ["WARM_OUT"], "a") as out:
        out.write(json.dumps(report) + "\n")
    if "--sleep" in args:
        time.sleep(float(args[args.index("--sleep") + 1]))
    sys.exit(int(args[args.index("--exit") + 1]) if "--exit" in args else 0)
