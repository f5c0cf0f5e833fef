"""``benchmarks/gpu_check.py`` is run by hand on a GPU machine; here its CPU smoke mode keeps it runnable, so the
script cannot rot between GPU sessions (a check it cannot run on a CPU says SKIP, never PASS)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_in_quick_mode(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    status = {c["check"]: c["status"] for c in checks}
    assert "FAIL" not in status.values()
    assert status["supra fla kernel vs torch forms"] == "SKIP"  # no CUDA here: reported, not passed
    assert sum(name.startswith("kv bf16 sdpa fast exact") for name in status) == 7
    assert any(name.startswith("s4d fft == scan") for name in status)


def test_gpu_check_refuses_without_cuda_unless_asked():
    import torch

    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
