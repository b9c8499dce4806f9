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

# SRHT: gather, transform and apply, at the default Hadamard size.
from ferret.kernels import srht as S  # noqa: E402

SIZE = 4096
table = {"offsets_ptr": "*i64", "sizes_ptr": "*i64", "seed": "i64", "SIZE": "constexpr"}
for dtype in ("fp32", "bf16"):
    signature = {"x_ptr": f"*{dtype}", "n": "i64", "start": "i64", "tile_ptr": "*fp32", **table}
    kernel = triton.compile(ASTSource(S._gather_kernel, signature, {"SIZE": SIZE}), target=TARGET)
    print(f"sm_90 srht gather {dtype}: cubin {len(kernel.asm['cubin'])} B")
    signature = {"out_ptr": f"*{dtype}", "n": "i64", "start": "i64", "tile_ptr": "*fp32", "factors_ptr": "*fp32",
                 **table}
    kernel = triton.compile(ASTSource(S._apply_kernel, signature, {"SIZE": SIZE}), target=TARGET,
                            options={"enable_fp_fusion": False})
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    print(f"sm_90 srht apply {dtype}: cubin {len(kernel.asm['cubin'])} B, fused-fma {fused}")
kernel = triton.compile(ASTSource(S._fwht_kernel, {"tile_ptr": "*fp32", "sizes_ptr": "*i64", "SIZE": "constexpr",
                                                   "LOG": "constexpr"}, {"SIZE": SIZE, "LOG": 12}), target=TARGET)
print(f"sm_90 srht fwht {SIZE}: cubin {len(kernel.asm['cubin'])} B")

# LoRA: a stack of three clients with heterogeneous ranks, into fp32 and bf16 weights.
from ferret.kernels import lora as L  # noqa: E402

ranks = (64, 8, 4)
for dtype in ("fp32", "bf16"):
    signature = {"w_ptr": f"*{dtype}", "a_ptrs": (f"*{dtype}",) * 3, "b_ptrs": (f"*{dtype}",) * 3,
                 "coefs": ("fp32",) * 3, "M": "i32", "N": "i32", "stride_wm": "i32", "stride_wn": "i32",
                 "RANKS": "constexpr", "RANK_BLOCKS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    constexprs = {"RANKS": ranks, "RANK_BLOCKS": tuple(L.rank_block(r) for r in ranks),
                  "BLOCK_M": L.BLOCK_M, "BLOCK_N": L.BLOCK_N}
    kernel = triton.compile(ASTSource(L._merge_kernel, signature, constexprs), target=TARGET)
    print(f"sm_90 lora merge ranks {ranks} {dtype}: cubin {len(kernel.asm['cubin'])} B")
signature = {"x_ptr": "*fp32", "w_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32",
             **{k: "i32" for k in ("M", "N", "K", "R", "stride_xm", "stride_wn", "stride_wk", "stride_ym")},
             **{k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")}}
constexprs = {"BLOCK_M": 64, "BLOCK_N": L.BLOCK_N, "BLOCK_K": 32, "BLOCK_R": 128}
kernel = triton.compile(ASTSource(L._stacked_linear_kernel, signature, constexprs), target=TARGET)
print(f"sm_90 lora stacked linear fp32: cubin {len(kernel.asm['cubin'])} B")
