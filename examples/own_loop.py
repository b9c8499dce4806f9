"""Federated fine-tuning in plain PyTorch over ferret's public API: each round, every client
trains a copy of the global model, uploads its update as one ferret.Round packet (3,800 numbers
instead of 260K), and the server applies the weighted mean of the uploads.

    python examples/own_loop.py          # stories260K, ships with ferret; about 10 s on a CPU
"""

import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ferret
from ferret.fl import synthetic_tasks
from ferret.fl.models import stories260k_dir

CLIENTS, ROUNDS, STEPS, LR, BUDGET = 4, 3, 8, 0.03, 3800
tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
server = AutoModelForCausalLM.from_pretrained(stories260k_dir())
texts = [f"{t.instruction} {t.response}" for t in synthetic_tasks(20, seed=0)]
held_out, texts = texts[:10], texts[10:]
shards = [texts[c::CLIENTS] for c in range(CLIENTS)]  # each client's own examples


def loss(model, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    return model(ids, labels=ids).loss


def local_training(model, shard):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        loss(model, shard[step % len(shard)]).backward()
        optimizer.step()
        optimizer.zero_grad()


def eval_loss(model):
    with torch.no_grad():
        return sum(loss(model, text).item() for text in held_out) / len(held_out)


torch.manual_seed(0)
print(f"round 0: eval loss {eval_loss(server):.4f}")
for r in range(ROUNDS):
    rnd = ferret.Round(seed=r, clients=CLIENTS, budget=BUDGET)
    uploads = []
    for c in range(CLIENTS):
        client = copy.deepcopy(server)  # the client's copy of the global model
        local_training(client, shards[c])
        packet = rnd.compress(client, client=c, start=server)  # its update, read in place: new - start
        uploads.append(packet.to_bytes())  # what travels to the server
    packets = [ferret.Packet.from_bytes(u) for u in uploads]
    rnd.apply(rnd.merge(packets, weights=[len(s) for s in shards]), into=server)
    print(f"round {r + 1}: eval loss {eval_loss(server):.4f}, {len(uploads[0]):,} bytes up per client")
