"""Flower's clientapp process, as the warm zygote (fedhosp/warm_clientapp.py) runs it in a forked child.

`flwr-clientapp` (the console script the SuperNode starts per task) is
`flwr.supernode.cli.flwr_clientapp:flwr_clientapp`; the zygote imports that module before
it forks, so each task starts with Flower's own entry point already loaded.
"""

from __future__ import annotations

ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
MODULE = ENTRY.partition(":")[0]
COMMAND = "flwr-clientapp"  # the console script's name, on the SuperNode's PATH
