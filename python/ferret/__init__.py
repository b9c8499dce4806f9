"""ferret: federated fine-tuning of LLMs at a communication cost that does not grow with the model.

A round of Ferret in your own training loop (``fl.Ferret``'s defaults: dense Hadamard bases,
each client its own rows)::

    import ferret
    rnd = ferret.Round(seed, clients=10, budget=3800)
    packet = rnd.compress(update, client=3)                            # a client's upload
    broadcast = rnd.merge(packets, weights)                            # the server's weighted mean
    rnd.apply(broadcast, into=model, scale=server_lr)                  # model += lr * mean

The seeded projection underneath (its own defaults are the paper's: shared Rademacher bases)::

    packet = ferret.compress(update, seed=round_seed, budget=1024)     # K fp32 numbers
    ferret.reconstruct(packet, into=params, scale=server_lr)           # params += lr * update
    ferret.perturb(params, seed, eps)                                  # params += eps * z(seed)
    ferret.merge_by_seed(packets, weights)                             # a server's weighted merge
    ferret.estimate_norms(packet, layout)                              # what it adds to each block

The compiled core's loops use ``torch.get_num_threads()`` threads unless ``ferret.set_num_threads``
(or ``FERRET_NUM_THREADS``) says otherwise.

LoRA aggregation (FLoRA's stacking and its baselines) lives in :mod:`ferret.lora`.

CPU tensors and NumPy arrays run on the compiled core, CUDA tensors on the Triton kernels; both
follow the basis spec in :mod:`ferret.spec` bit for bit.
"""

from . import allocation, lora, slots, spec
from ._core import simd_level
from .allocation import allocate, check_budget
from .backends import num_threads, set_num_threads
from .layout import Layout
from .packet import Packet, PacketError
from .projection import NonFiniteError, compress, estimate_norms, merge_by_seed, merge_packets, perturb, reconstruct
from .round import Round
from .sharded import Shard
from .spec import block_seed, normalize_seed

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "NonFiniteError",
    "Packet",
    "PacketError",
    "Round",
    "Shard",
    "allocate",
    "allocation",
    "block_seed",
    "check_budget",
    "compress",
    "estimate_norms",
    "lora",
    "merge_by_seed",
    "merge_packets",
    "normalize_seed",
    "num_threads",
    "perturb",
    "reconstruct",
    "set_num_threads",
    "simd_level",
    "slots",
    "spec",
]
