"""A hospital provisioned as in docs/hospital.md: its key pair and CSR, then the client certificate the
coordinator signs with the offline CA folder (`fedhosp certs site`, then `fedhosp certs sign`)."""

from pathlib import Path

from fedhosp import certs


def site(name: str, folder: Path, certs_dir: Path) -> certs.SiteKeys:
    """`name`'s keys in `folder`, and NAME.crt beside them, signed by the CA `certs.init(certs_dir)` made."""
    keys = certs.site(name, folder)
    certs.sign(keys.request, certs.ca_dir(certs_dir), folder)
    return keys


# Runs a command as a child subreaper: Flower's SuperNode starts its SuperExec in a session of its own,
# and an orphaned SuperExec can outlive it; this stops and reaps all of them (`python -c CONTAIN CMD...`).
CONTAIN = """
import subprocess, sys
from fedhosp import processes
processes.become_subreaper()
try:
    code = subprocess.call(sys.argv[1:], timeout=150, stderr=subprocess.STDOUT)
finally:
    processes.stop_strays()
sys.exit(code)
"""
