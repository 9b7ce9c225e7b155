"""Flower's environment is set in one place (common/flower_env.py), and every way in gets it."""

import os
import re
import subprocess
import sys
from pathlib import Path

from common import flower_env

ROOT = Path(__file__).resolve().parents[2]
SETS = re.compile(r"\bFLWR_[A-Z_]+\s*[:=]|[\"']FLWR_(TELEMETRY|DISABLE|SUPEREXEC)[A-Z_]*[\"']")


def _env_of_import(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")} | extra
    code = "import os, fedhosp; print(os.environ['FLWR_TELEMETRY_ENABLED'], os.environ['FLWR_DISABLE_UPDATE_CHECK'])"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_fedhosp_command_quiets_flower_before_anything_else_and_the_user_can_override():
    assert _env_of_import() == ["0", "1"]
    assert _env_of_import(FLWR_TELEMETRY_ENABLED="1") == ["1", "1"]


def test_every_flower_process_we_start_gets_the_deployment_settings(tmp_path):
    env = flower_env.command_env(tmp_path)
    assert {k: env[k] for k in flower_env.DEPLOYMENT} == flower_env.DEPLOYMENT and env["FLWR_HOME"] == str(tmp_path)


def test_no_other_file_sets_flowers_environment():
    candidates = [ROOT / "Makefile", *ROOT.glob("docker/*"), *(p for d in ("common", "client", "server",
                  "simulation", "fedhosp", "bench") for p in (ROOT / d).rglob("*.py"))]
    setters = [p.relative_to(ROOT).as_posix() for p in candidates if p.is_file() and SETS.search(p.read_text())]
    assert setters == ["common/flower_env.py"], setters
