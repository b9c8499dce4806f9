"""A client too big for one device trains with FSDP2 (``fully_shard``) and uploads one packet: every
rank compresses its own shards of the update, the ranks exchange a few thousand numbers a
tensor, and the packet is the one the whole update would give, byte for byte (checked here).

    torchrun --nproc-per-node 2 examples/fsdp_client.py      # stories260K on 2 CPU processes (gloo)
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

import ferret
from ferret.fl import synthetic_tasks
from ferret.fl.models import stories260k_dir

dist.init_process_group("gloo")
rank, mesh = dist.get_rank(), init_device_mesh("cpu", (dist.get_world_size(),))
tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
model = AutoModelForCausalLM.from_pretrained(stories260k_dir())
fully_shard(model, mesh=mesh)  # every parameter now a DTensor: each rank holds its rows
start = {n: p.detach().clone() for n, p in model.named_parameters()}  # the client's snapshot, sharded too

optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
texts = [f"{t.instruction} {t.response}" for t in synthetic_tasks(4, seed=rank)]
for text in texts:  # local training, as FSDP2 does it
    ids = tokenizer(text, return_tensors="pt").input_ids
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

update = {n: p.detach() - start[n] for n, p in model.named_parameters()}  # sharded like the weights
rnd = ferret.Round(seed=0, clients=4, budget=3800)
packet = rnd.compress(update, client=1)  # collective: every rank gets the same packet
whole = {n: u.full_tensor() for n, u in update.items()}  # only to check the claim below
assert packet.to_bytes() == rnd.compress(whole, client=1).to_bytes()
if rank == 0:
    print(f"one packet of {len(packet.to_bytes()):,} bytes from {dist.get_world_size()} ranks, "
          f"equal to the whole update's")
dist.destroy_process_group()
