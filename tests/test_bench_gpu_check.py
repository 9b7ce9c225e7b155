"""bench/gpu_check.py stays runnable where no GPU is: `--cpu` runs the same checks with CPU as the device
(every gradient compared with itself, a simulation on Ray with no GPU share), and must pass (~30 s)."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # it starts Ray once


def test_gpu_check_passes_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("PASSED: 0 of")
    assert any(line.startswith("unet") and "dp (" in line for line in lines)
    assert any(line.startswith("simulate 3 sites") and line.endswith("ok") for line in lines)


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    from bench import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--cpu" in capsys.readouterr().err
