"""Federated fine-tuning on top of ferret's public API: data, local training, the algorithms
(one unit each, registered by name), the round protocol both engines follow, and the embedded
engine that runs them in one process."""

from .algorithms import (ALGORITHMS, Algorithm, FedAvg, FedIT, FedKSeed, FedZO, Ferret, FLoRA, LocalTraining,
                         MalformedUpload, ZeroPadding, build, register)
from .data import (DataError, Example, dirichlet_split, encode, holdout, load_dolly, load_natural_instructions,
                   synthetic_tasks)
from .evaluate import eval_loss, load_mmlu, mmlu_accuracy, rouge_l
from .results import RoundRecord, RunResult
from .simulation import run

__all__ = ["ALGORITHMS", "Algorithm", "DataError", "Example", "FLoRA", "FedAvg", "FedIT", "FedKSeed", "FedZO",
           "Ferret", "LocalTraining", "MalformedUpload", "RoundRecord", "RunResult", "ZeroPadding", "build",
           "dirichlet_split", "encode", "eval_loss", "holdout", "load_dolly", "load_mmlu",
           "load_natural_instructions", "mmlu_accuracy", "register", "rouge_l", "run", "synthetic_tasks"]
