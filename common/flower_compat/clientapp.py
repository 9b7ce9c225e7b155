"""Flower's clientapp process, as the warm zygote (fedhosp/warm_clientapp.py) runs it in a forked child.

`flwr-clientapp` (the console script the SuperNode starts per task) is
`flwr.supernode.cli.flwr_clientapp:flwr_clientapp`; the zygote imports that module before
it forks, so each task starts with Flower's own entry point already loaded.
"""

from __future__ import annotations

ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
MODULE = ENTRY.partition(":")[0]
COMMAND = "flwr-clientapp"  # the console script's name, on the SuperNode's PATH
# Where Flower's clientapp installs a run's app bundle, under the Flower home (`flwr.common.constant.APP_DIR`:
# `<home>/apps/<publisher>.<name>.<version>.<hash prefix>`), the folder its loader puts first on sys.path;
# fedhosp/approved_code.py judges imports from there.
APPS = "apps"


def task_identity() -> tuple[int | None, int | None]:
    """The run and node of the task this clientapp process serves, once Flower has pulled it
    (`flwr.supercore.task_identity.TaskIdentity`, set by `pull_task_input`); (None, None) before,
    or on a Flower without it. Used only to label the site's own audit line."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        return None, None
    def read(name: str) -> int | None:
        try:
            return getattr(TaskIdentity, name, None)
        except RuntimeError:  # "TaskIdentity.run_id is not set."
            return None

    return read("run_id"), read("node_id")
