"""Updates sharded over ranks (DTensors, as FSDP2 holds them): two processes on the gloo backend
compress their shards into the whole update's packet, byte for byte, and reconstruct into their
own shards the whole reconstruction's values, with no gathering."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.tensor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(script: Path):
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    return ranks, [p.communicate(timeout=300) for p in ranks]


def test_two_ranks_give_the_whole_updates_packet_and_rebuild_their_shards():
    script = Path(__file__).with_name("sharded_ranks.py")
    ranks, outs = _run_ranks(script)
    if any("address already in use" in err.lower() for _, err in outs):  # the free port was taken meanwhile
        ranks, outs = _run_ranks(script)
    for rank, (p, (out, err)) in enumerate(zip(ranks, outs)):
        assert p.returncode == 0 and f"{rank} ok" in out, out + err[-3000:]
