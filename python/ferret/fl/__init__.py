"""Federated fine-tuning on top of ferret's public API: data, local training, the algorithms
(one object each) and the embedded engine that runs them in one process."""

from .algorithms import (ALGORITHMS, Algorithm, FedAvg, FedIT, FedKSeed, FedZO, Ferret, FLoRA, LocalTraining,
                         ZeroPadding)
from .data import (DataError, Example, dirichlet_split, encode, holdout, load_dolly, load_natural_instructions,
                   synthetic_tasks)
from .simulation import RoundRecord, RunResult, run
from .evaluate import eval_loss, load_mmlu, mmlu_accuracy, rouge_l

__all__ = ["ALGORITHMS", "Algorithm", "DataError", "Example", "FLoRA", "FedAvg", "FedIT", "FedKSeed", "FedZO",
           "Ferret", "LocalTraining", "RoundRecord", "RunResult", "ZeroPadding", "dirichlet_split", "encode",
           "eval_loss", "holdout", "load_mmlu", "mmlu_accuracy", "load_dolly", "load_natural_instructions", "rouge_l", "run", "synthetic_tasks"]
