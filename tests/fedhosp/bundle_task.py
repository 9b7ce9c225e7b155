"""A clientapp task's bundle steps, as Flower's `run_clientapp` does them, behind the site's guard.

`python -m tests.fedhosp.bundle_task FAB [GUARD...]` (run with FLWR_HOME set): install the guard
(unless `--no-guard`), install the bundle with Flower's own `install_from_fab`, load its ClientApp
with Flower's own loader, and print one JSON line: where the ClientApp's modules came from, or the
error the task would have failed with.
"""

import hashlib
import json
import sys
import tomllib
from pathlib import Path

from fedhosp import approved_code
from tests.flower_probes import get_load_client_app_fn, install_from_fab


def main(argv: list[str] | None = None) -> None:
    fab, *guard = sys.argv[1:] if argv is None else argv
    if guard != ["--no-guard"]:
        approved_code.install_from(approved_code.parser().parse_args(guard))
    content = Path(fab).read_bytes()
    installed = install_from_fab(content, skip_prompt=True)
    config = tomllib.loads((installed / "pyproject.toml").read_text())
    fab_id = f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"
    version, digest = config["project"]["version"], hashlib.sha256(content).hexdigest()
    try:
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(fab_id, version, digest)
    except Exception as exc:  # what run_clientapp would report to the server
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "bundle": str(installed)}))
        return
    modules = {name: sys.modules[name].__file__ for name in ("client.app", "client.site", "common.config")}
    leaky = hasattr(sys.modules["client.site"], "leaky_train")  # the tampered bundle's code ran
    print(json.dumps({"app": type(app).__name__, "modules": modules, "leaky": leaky, "bundle": str(installed)}))


if __name__ == "__main__":
    main()
