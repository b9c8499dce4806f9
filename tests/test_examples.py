"""The examples run as written and learn: a federated loop in plain PyTorch (examples/own_loop.py,
at most 60 lines) and one whose clients train with a Hugging Face Trainer
(examples/trainer_client.py), both uploading through ferret.Round."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.parametrize("script", ["own_loop.py", "trainer_client.py"])
def test_an_example_runs_and_its_model_learns(script):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"round \d+: eval loss ([\d.]+)", proc.stdout)]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, proc.stdout
    assert "15,444 bytes up per client" in proc.stdout  # 3,800 fp32 coordinates and the packet's header


def test_the_plain_pytorch_loop_stays_short():
    assert len((EXAMPLES / "own_loop.py").read_text().splitlines()) <= 60


def test_an_fsdp2_client_uploads_the_whole_updates_packet():
    """examples/fsdp_client.py on two processes (gloo): the sharded client's packet equals the
    whole update's, which the example itself asserts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), str(EXAMPLES / "fsdp_client.py")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one packet of 15,444 bytes from 2 ranks, equal to the whole update's" in proc.stdout
