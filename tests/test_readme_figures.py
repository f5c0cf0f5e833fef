"""The README's state-size figures are the code's: ``benchmarks/readme_state_bytes.py --check`` rebuilds each from
an untrained model of the same shape and fails, naming the figure, if the README quotes another number."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_state_bytes.py"


def test_readme_state_figures_match_the_code():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
