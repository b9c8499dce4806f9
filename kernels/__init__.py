"""Triton kernels for ferret (installed as ``ferret.kernels``; needs the ``[gpu]`` extra).

``projection``: seeded-basis compress / reconstruct / perturb, fused, one pass over each tile,
bit-identical to the CPU core for Rademacher bases.
``srht``: the chunk-sparse subsampled randomized Hadamard transform, chunk by chunk.
``hadamard``: the dense randomized Hadamard basis: a signed fold of each block, one transform,
and an apply pass, bit-identical to the core.
``lora``: the LoRA stack merge (``W += Σ c_i B_i A_i`` over heterogeneous ranks, one launch) and
the fused forward with an unmerged stacked adapter. The kernels know nothing of layouts,
packets or federated learning.
"""
