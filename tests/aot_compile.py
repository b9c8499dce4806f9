"""Compile ferret's Triton kernels for sm_90 with no GPU present (Triton ships ptxas), so errors
only the real compiler finds surface on CPU-only machines. Prints one line per kernel; the
reconstruct kernels must contain no fused multiply-add (the spec rounds twice)."""

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ferret.kernels import projection as P

TARGET = GPUTarget("cuda", 90, 32)
COMMON = {"n": "i64", "start": "i64", "first_tile": "i64", "seed": "i64", "K": "i32", "BASIS": "constexpr",
          "GROUPS": "constexpr"}


def build(fn, signature, basis):
    src = ASTSource(fn, {**signature, **COMMON}, constexprs={"BASIS": basis, "GROUPS": P.GROUPS})
    return triton.compile(src, target=TARGET, options={"enable_fp_fusion": False})


for dtype in ("fp32", "bf16", "fp16"):
    kernel = build(P._reconstruct_kernel, {"out_ptr": f"*{dtype}", "g_ptr": "*fp32", "scale": "fp32"}, P.RADEMACHER)
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    print(f"sm_90 reconstruct rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B, fused-fma {fused}")
    kernel = build(P._compress_kernel, {"x_ptr": f"*{dtype}", "part_ptr": "*fp32"}, P.RADEMACHER)
    print(f"sm_90 compress rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B")
kernel = build(P._compress_kernel, {"x_ptr": "*fp32", "part_ptr": "*fp32"}, P.GAUSSIAN)
print(f"sm_90 compress gaussian fp32: cubin {len(kernel.asm['cubin'])} B")
