"""Triton kernels for ferret (installed as ``ferret.kernels``; needs the ``[gpu]`` extra).

``projection``: seeded-basis compress / reconstruct / perturb, fused, one pass over each tile,
bit-identical to the CPU core for Rademacher bases. The kernels know nothing of layouts,
packets or federated learning.
"""
