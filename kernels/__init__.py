"""Triton kernels for ferret (installed as ``ferret.kernels``; needs the ``[gpu]`` extra).

``projection``: seeded-basis compress / reconstruct / perturb, fused, one pass over each tile,
bit-identical to the CPU core for Rademacher bases.
``lora``: the LoRA stack merge (``W += Σ c_i B_i A_i`` over heterogeneous ranks, one launch) and
the fused forward with an unmerged stacked adapter. The kernels know nothing of layouts,
packets or federated learning.
"""
