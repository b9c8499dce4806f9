"""LoRA aggregation: FLoRA's stacking, the FedIT and zero-padding baselines, PEFT interop.

A server step, from PEFT client adapters to merged base weights::

    from ferret import lora
    clients = [lora.from_peft(m) for m in client_peft_models]        # any ranks
    update = lora.stack(clients, weights=example_counts)             # Σ p_i s_i B_i A_i, exactly
    lora.merge_into(base_model, update)                              # W += ΔW, in place
    peft_model = lora.to_peft_model(other_base, update)              # or keep it unmerged
"""

from .adapter import LoraAdapter, LoraError, LoraTerm
from .aggregate import client_weights, fedit, stack, zero_pad
from .merge import forward, merge_into
from .peft_io import from_peft, to_peft, to_peft_model

__all__ = [
    "LoraAdapter",
    "LoraError",
    "LoraTerm",
    "client_weights",
    "fedit",
    "forward",
    "from_peft",
    "merge_into",
    "stack",
    "to_peft",
    "to_peft_model",
    "zero_pad",
]
