"""Every algorithm of :mod:`ferret.fl` on Flower (``pip install "ferret-fl[flower]"``).

* :func:`server_app` / :func:`client_app`: a ServerApp and a ClientApp configured like
  ``ferret run`` (see :mod:`ferret.flower.apps`); ``examples/flower/`` is a Flower App built on them.
* :class:`AlgorithmStrategy`: the Flower ``Strategy`` that drives one algorithm object; the
  per-algorithm classes below only name which.
* :mod:`ferret.flower.records`: how each algorithm's upload travels as Flower records.
* :mod:`ferret.flower.client`: a client's round (replay the missed broadcasts, then train).
* :mod:`ferret.flower.secagg`: Ferret's coordinates summed with Flower's SecAgg+.

The algorithms' arithmetic lives in :mod:`ferret.fl.algorithms` alone; the embedded loop and
Flower drive the same objects, and with the same settings reach the same global weights.
"""

from ..fl.algorithms import FedAvg, FedIT, FedKSeed, FedZO, Ferret, FLoRA, ZeroPadding
from .apps import client_app, config_from_run, server_app
from .records import MalformedReply, codec_for
from .strategy import AlgorithmStrategy


def _strategy_for(algorithm_class, doc: str):
    def __init__(self, algorithm, model, **kwargs):
        if not isinstance(algorithm, algorithm_class):
            raise TypeError(f"{type(self).__name__} drives {algorithm_class.__name__}, got {type(algorithm).__name__}")
        AlgorithmStrategy.__init__(self, algorithm, model, **kwargs)

    return type(f"{algorithm_class.__name__}Strategy", (AlgorithmStrategy,), {"__init__": __init__, "__doc__": doc})


FerretStrategy = _strategy_for(Ferret, "Ferret on Flower: uploads are K float32 coordinates and packet metadata.")
FLoRAStrategy = _strategy_for(FLoRA, "FLoRA on Flower: uploads are each client's LoRA A and B at its own rank.")
FedITStrategy = _strategy_for(FedIT, "FedIT on Flower: equal-rank LoRA adapters, averaged.")
ZeroPaddingStrategy = _strategy_for(ZeroPadding, "Zero-padding on Flower: LoRA adapters padded to the largest rank.")
FedAvgStrategy = _strategy_for(FedAvg, "FedAvg on Flower: uploads are full fp32 updates.")
FedZOStrategy = _strategy_for(FedZO, "FedZO on Flower: zeroth-order local steps, full updates.")
FedKSeedStrategy = _strategy_for(FedKSeed, "FedKSeed on Flower: uploads are K scalars.")

__all__ = ["server_app", "client_app", "config_from_run", "AlgorithmStrategy", "MalformedReply", "codec_for",
           "FerretStrategy", "FLoRAStrategy", "FedITStrategy", "ZeroPaddingStrategy", "FedAvgStrategy",
           "FedZOStrategy", "FedKSeedStrategy"]
