"""The GPU proof script's dry run: where there is no GPU, ``bench/gpu/run.py`` runs every step at
tiny sizes on the CPU (the Triton kernels in the interpreter), so the script cannot rot. The
federated step doubles as a check that a run through the Triton kernels ends with the compiled
core's weights, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "run.py"

pytest.importorskip("triton", reason="the [gpu] extra (triton) is not installed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run bench/gpu/run.sh itself")
def test_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and set(summary["steps"]) == {"machine", "tests", "bench", "federated", "round"}
    assert not [name for name, step in summary["steps"].items() if "error" in step or step.get("failed")]
    for algorithm in ("ferret", "fedavg"):
        assert summary["steps"]["federated"][algorithm]["gpu"]["bit_identical_to_cpu"], algorithm
    ops = {(row["op"], row["basis"]) for row in summary["steps"]["bench"]["projection"]["rows"]}
    assert {("compress", "rademacher"), ("reconstruct", "rademacher"), ("perturb", "rademacher"),
            ("compress", "srht")} <= ops
    assert set(summary["steps"]["round"]) >= {"smollm2-135m", "llama-1b"}
    report = (tmp_path / "summary.md").read_text()
    assert "## Kernels" in report and "## Federated job" in report and "## One Ferret round" in report
