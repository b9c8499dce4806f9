"""One rank of tests/test_sharded.py: DTensor-sharded compress and reconstruct against the whole
tensors' (run as ``python tests/sharded_ranks.py RANK PORT`` by two processes; prints ``ok``)."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import ferret

rank, world, port = int(sys.argv[1]), 2, sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=world)
mesh = init_device_mesh("cpu", (world,))
gen = torch.Generator().manual_seed(0)
# rows split 19 / 18 (a shard boundary inside a chunk), fp32 and bf16, and a replicated tensor
full = {"emb": torch.randn(37, 50, generator=gen), "norm": torch.randn(64, generator=gen),
        "w": torch.randn(300, 70, generator=gen).bfloat16(), "r": torch.randn(5, 3, generator=gen)}


def placed(tensors):
    return {k: distribute_tensor(v.clone(), mesh, [Replicate()] if k == "r" else [Shard(0)]) for k, v in tensors.items()}


sharded, ok = placed(full), True
for kwargs in (dict(basis="hadamard"), dict(basis="hadamard:256", allocation="uniform"),
               dict(basis="hadamard", grouping=5000), dict(basis="hadamard", slot=1, slots=3)):
    if ferret.compress(sharded, seed=4, budget=300, **kwargs).to_bytes() != \
            ferret.compress(full, seed=4, budget=300, **kwargs).to_bytes():
        ok = False
        print(rank, "packets differ:", kwargs)
packet = ferret.compress(full, seed=4, budget=300, basis="hadamard")
into, want = placed(full), {k: v.clone() for k, v in full.items()}
ferret.reconstruct(packet, into=into, scale=0.3)
ferret.reconstruct(packet, into=want, scale=0.3)
ok &= all(torch.equal(into[k].full_tensor(), want[k]) for k in full)
# local parts with their offsets (a sharding of the caller's own): rank r holds the r-th half
halves = {k: ferret.Shard(v.reshape(-1)[rank * (v.numel() // 2): (rank + 1) * (v.numel() // 2) if rank == 0 else None]
                          .contiguous(), rank * (v.numel() // 2), tuple(v.shape)) for k, v in full.items()}
ok &= ferret.compress(halves, seed=9, budget=300, basis="hadamard").to_bytes() == \
    ferret.compress(full, seed=9, budget=300, basis="hadamard").to_bytes()
if os.environ.get("TRITON_INTERPRET") == "1":  # the shards read by the Triton kernels (a GPU's path)
    ok &= ferret.compress(sharded, seed=4, budget=300, basis="hadamard", backend="triton").to_bytes() == \
        ferret.compress(full, seed=4, budget=300, basis="hadamard").to_bytes()
rnd = ferret.Round(7, 3, 300)  # the public round takes them too
ok &= rnd.compress(sharded, client=2).to_bytes() == rnd.compress(full, client=2).to_bytes()
try:
    ferret.compress(sharded, seed=4, budget=300, basis="rademacher")
    ok = False
except ValueError as err:
    ok &= "dense hadamard basis" in str(err)
print(rank, "ok" if ok else "FAIL", flush=True)
dist.destroy_process_group()
