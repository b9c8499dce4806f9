"""Federated fine-tuning where each client's local training is a Hugging Face ``Trainer``: the
client trains a copy of the global model with the Trainer it already uses, then uploads its
update as one ferret.Round packet; the server merges the uploads and steps the global model.

    python examples/trainer_client.py    # stories260K, ships with ferret; about 20 s on a CPU
"""

import copy
import tempfile

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

import ferret
from ferret.fl import synthetic_tasks
from ferret.fl.models import stories260k_dir

CLIENTS, ROUNDS, STEPS, LR, BUDGET = 3, 2, 10, 3e-3, 3800
tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
tokenizer.pad_token = tokenizer.eos_token  # the collator pads batches
server = AutoModelForCausalLM.from_pretrained(stories260k_dir())
texts = [f"{t.instruction} {t.response}" for t in synthetic_tasks(20, seed=0)]
held_out, texts = texts[:10], texts[10:]
shards = [[tokenizer(t) for t in texts[c::CLIENTS]] for c in range(CLIENTS)]


def local_training(model, shard, out):
    args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=shard, data_collator=collator).train()


def eval_loss(model):
    with torch.no_grad():
        ids = [tokenizer(t, return_tensors="pt").input_ids for t in held_out]
        return sum(model(x, labels=x).loss.item() for x in ids) / len(ids)


print(f"round 0: eval loss {eval_loss(server):.4f}")
with tempfile.TemporaryDirectory() as out:
    for r in range(ROUNDS):
        rnd = ferret.Round(seed=r, clients=CLIENTS, budget=BUDGET)
        uploads = []
        for c in range(CLIENTS):
            client = copy.deepcopy(server)
            local_training(client, shards[c], out)
            uploads.append(rnd.compress(client, client=c, start=server).to_bytes())  # client - server, in place
        packets = [ferret.Packet.from_bytes(u) for u in uploads]
        rnd.apply(rnd.merge(packets, weights=[len(s) for s in shards]), into=server)
        print(f"round {r + 1}: eval loss {eval_loss(server):.4f}, {len(uploads[0]):,} bytes up per client")
