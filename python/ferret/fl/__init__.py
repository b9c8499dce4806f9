"""Federated fine-tuning on top of ferret's public API: data, local training, the algorithms
(one unit each, registered by name), the round protocol and the server round both engines follow,
and the embedded engine that runs them in one process."""

from .algorithms import (ALGORITHMS, Algorithm, FedAvg, FedIT, FedKSeed, FedZO, Ferret, FLoRA, LocalTraining,
                         MalformedUpload, ZeroPadding, build, register)
from .data import DataError, Example, encode, holdout, load_dolly, load_natural_instructions, synthetic_tasks
from .evaluate import eval_loss, load_mmlu, mmlu_accuracy, rouge_l
from .partitions import PARTITIONS, partition
from .results import RoundRecord, RunResult
from .server import Server
from .sources import load_examples
from .templates import prompt_format
from .simulation import run

__all__ = ["ALGORITHMS", "Algorithm", "DataError", "Example", "FLoRA", "FedAvg", "FedIT", "FedKSeed", "FedZO",
           "Ferret", "LocalTraining", "MalformedUpload", "RoundRecord", "RunResult", "ZeroPadding", "build",
           "PARTITIONS", "Server", "encode", "eval_loss", "holdout", "load_dolly", "load_examples", "load_mmlu",
           "load_natural_instructions", "mmlu_accuracy", "partition", "prompt_format", "register", "rouge_l", "run",
           "synthetic_tasks"]
