"""Every algorithm of :mod:`ferret.fl` on Flower (``pip install "ferret-fl[flower]"``).

* :func:`server_app` / :func:`client_app`: a ServerApp and a ClientApp configured like
  ``ferret run`` (see :mod:`ferret.flower.apps`); ``examples/flower/`` is a Flower App built on them.
* :class:`AlgorithmStrategy`: the Flower ``Strategy`` that drives any algorithm object, following
  the same round protocol as the embedded loop (:mod:`ferret.fl.protocol`).
* :mod:`ferret.flower.records`: an upload as Flower records (one codec for every algorithm).
* :mod:`ferret.flower.client`: a client's round (replay the missed broadcasts, then train).
* :mod:`ferret.flower.secagg`: uploads summed with Flower's SecAgg+, through the algorithm's
  secure-aggregation hook (Ferret's coordinates).

The algorithms' arithmetic lives in :mod:`ferret.fl.algorithms` alone; the embedded loop and
Flower drive the same objects, and with the same settings reach the same global weights.
"""

from .apps import client_app, config_from_run, server_app
from .records import from_record, to_record
from .strategy import AlgorithmStrategy

__all__ = ["server_app", "client_app", "config_from_run", "AlgorithmStrategy", "from_record", "to_record"]
