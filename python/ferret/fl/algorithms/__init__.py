"""The federated algorithms, one module each, behind one interface (:class:`Algorithm`)."""

from .base import Algorithm, ClientContext, LocalTraining, NonFiniteUpdate, RoundContext
from .fedavg import FedAvg, FedZO
from .fedkseed import FedKSeed
from .ferret import Ferret
from .lora import FedIT, FLoRA, ZeroPadding

ALGORITHMS = {cls.name: cls for cls in (Ferret, FedAvg, FedZO, FedKSeed, FLoRA, FedIT, ZeroPadding)}
ALGORITHMS["ferret-paper"] = Ferret.paper

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "FLoRA", "FedAvg", "FedIT", "FedKSeed", "FedZO", "Ferret",
           "LocalTraining", "NonFiniteUpdate", "RoundContext", "ZeroPadding"]
