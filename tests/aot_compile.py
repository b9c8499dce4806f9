"""Compile ferret's Triton kernels for sm_90 with no GPU present (Triton ships ptxas), so errors
only the real compiler finds surface on CPU-only machines. Prints one line per kernel; the
reconstruct kernels must contain no fused multiply-add (the spec rounds twice)."""

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ferret.kernels import projection as P

TARGET = GPUTarget("cuda", 90, 32)
COMMON = {"n": "i64", "start": "i64", "first_tile": "i64", "seed": "i64", "K": "i32"}


def build(fn, signature, constexprs, num_warps=4):
    src = ASTSource(fn, {**signature, **COMMON, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"enable_fp_fusion": False, "num_warps": num_warps})


rademacher = {"GROUPS": P.GROUPS}
for dtype in ("fp32", "bf16", "fp16"):
    kernel = build(P._reconstruct_kernel, {"out_ptr": f"*{dtype}", "g_ptr": "*fp32", "scale": "fp32"}, rademacher)
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    print(f"sm_90 reconstruct rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B, fused-fma {fused}")
    kernel = build(P._compress_kernel, {"x_ptr": f"*{dtype}", "part_ptr": "*fp64"}, {**rademacher, "INTERPRET": False})
    print(f"sm_90 compress rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B")
for dtype in ("fp32", "bf16"):
    src = ASTSource(P._sum_squares_kernel, {"x_ptr": f"*{dtype}", "part_ptr": "*fp64", "n": "i64",
                                            "GROUPS": "constexpr", "INTERPRET": "constexpr"},
                    constexprs={"GROUPS": P.GROUPS, "INTERPRET": False})
    kernel = triton.compile(src, target=TARGET, options={"num_warps": 4})
    print(f"sm_90 sum of squares {dtype}: cubin {len(kernel.asm['cubin'])} B")
tree = ASTSource(P._tree_kernel, {"part_ptr": "*fp64", "out_ptr": "*fp64", "rows": "i64", "offset": "i64", "K": "i32",
                                  "TREE": "constexpr", "LEVELS": "constexpr", "BASES": "constexpr"},
                 constexprs={"TREE": P.TREE, "LEVELS": P.TREE.bit_length() - 1, "BASES": P.TREE_BASES})
kernel = triton.compile(tree, target=TARGET)
print(f"sm_90 tree fp64: cubin {len(kernel.asm['cubin'])} B")
gaussian = {"TILE": P.TILE}
kernel = build(P._gaussian_compress_kernel, {"x_ptr": "*fp32", "part_ptr": "*fp32"}, gaussian)
print(f"sm_90 compress gaussian fp32: cubin {len(kernel.asm['cubin'])} B")
kernel = build(P._gaussian_reconstruct_kernel, {"out_ptr": "*fp32", "g_ptr": "*fp32", "scale": "fp32"}, gaussian)
print(f"sm_90 reconstruct gaussian fp32: cubin {len(kernel.asm['cubin'])} B")

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

# LoRA: the merge with the rank a runtime value (one build per dtype serves any client ranks), as
# the JIT specializes it for a row-major W of 16-aligned shape: unit column stride, R unspecialized.
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from triton import knobs  # noqa: E402

from ferret.kernels import lora as L  # noqa: E402


def resources(kernel):
    """(registers, local-memory bytes: spills) per thread of a compiled kernel, from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"LOCAL:(\d+)", usage)[1])


aligned = [["tt.divisibility", 16]]
for dtype, factors in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    tile = L.MERGE_TILES[factors]
    signature = {"w_ptr": f"*{dtype}", "bt_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "M": "i32", "N": "i32", "R": "i32",
                 "stride_wm": "i32", "stride_wn": "constexpr", "stride_bt": "i32", "stride_a": "i32",
                 **{k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "PRECISION")}}
    constexprs = {"stride_wn": 1, "BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_R": tile.BLOCK_R,
                  "PRECISION": tile.precision}
    attrs = {(L._merge_kernel.arg_names.index(k),): aligned
             for k in ("w_ptr", "bt_ptr", "a_ptr", "M", "N", "stride_wm", "stride_bt", "stride_a")}
    kernel = triton.compile(ASTSource(L._merge_kernel, signature, constexprs, attrs), target=TARGET,
                            options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    regs, spills = resources(kernel)
    print(f"sm_90 lora merge {dtype}, runtime rank, tile {tile.BLOCK_M}x{tile.BLOCK_N}x{tile.BLOCK_R} "
          f"{tile.precision}: cubin {len(kernel.asm['cubin'])} B, {regs} registers, {spills} B spilled, "
          f"wgmma {kernel.asm['ptx'].count('wgmma.mma_async')}")
signature = {"x_ptr": "*fp32", "w_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32",
             **{k: "i32" for k in ("M", "N", "K", "R", "stride_xm", "stride_wn", "stride_wk", "stride_ym")},
             **{k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")}}
constexprs = {"BLOCK_M": 64, "BLOCK_N": L.BLOCK_N, "BLOCK_K": 32, "BLOCK_R": 128}
kernel = triton.compile(ASTSource(L._stacked_linear_kernel, signature, constexprs), target=TARGET)
regs, spills = resources(kernel)
print(f"sm_90 lora stacked linear fp32: cubin {len(kernel.asm['cubin'])} B, {regs} registers, {spills} B spilled")

# Dense Hadamard: the fold (signed reads with the chunks' lane masks, and the unsigned passes over
# partial nodes) at lane widths 128 (B >= 128: 32 chunks a tile, one mask a row), 64, 8 and 2
# (B below 128: TILE / B chunks, 128 / B masks a row) and 1 (no masks), and the apply at the same
# widths.
from ferret.kernels import hadamard as D  # noqa: E402

fold = {"part_ptr": "*fp32", "n": "i64", "start": "i64", "first": "i64", "seed": "i64", "size": "i32",
        **{k: "constexpr" for k in ("SIGNED", "TILE", "BL", "LEVELS")}}
for dtype, signed, lanes in (("fp32", True, 128), ("bf16", True, 128), ("fp16", True, 128), ("fp32", False, 128),
                             ("fp32", True, 64), ("fp32", True, 8), ("fp32", True, 2), ("fp32", False, 2),
                             ("bf16", True, 1)):
    constexprs = {"SIGNED": signed, "TILE": D.TILE, "BL": lanes, "LEVELS": (D.TILE // lanes).bit_length() - 1}
    kernel = triton.compile(ASTSource(D._fold_kernel, {"x_ptr": f"*{dtype}", **fold}, constexprs), target=TARGET,
                            options={"num_warps": D.NUM_WARPS})
    regs, spills = resources(kernel)
    print(f"sm_90 hadamard fold {dtype} {'signed' if signed else 'partials'}, tile {D.TILE // lanes}x{lanes}: "
          f"cubin {len(kernel.asm['cubin'])} B, {regs} registers, {spills} B spilled")
for dtype, lanes in (("fp32", 128), ("bf16", 128), ("fp16", 128), ("fp32", 64), ("fp32", 8), ("fp32", 2),
                     ("bf16", 1)):
    signature = {"out_ptr": f"*{dtype}", "z_ptr": "*fp32", "n": "i64", "start": "i64", "first": "i64", "seed": "i64",
                 "scale": "fp32", "size": "i32", "TILE": "constexpr", "BL": "constexpr"}
    kernel = triton.compile(ASTSource(D._apply_kernel, signature, {"TILE": D.TILE, "BL": lanes}), target=TARGET,
                            options={"enable_fp_fusion": False, "num_warps": D.NUM_WARPS})
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    regs, spills = resources(kernel)
    print(f"sm_90 hadamard apply {dtype}, tile {D.TILE}, lanes {lanes}: cubin {len(kernel.asm['cubin'])} B, "
          f"{regs} registers, {spills} B spilled, fused-fma {fused}")
    assert fused == 0, "the apply kernel must round twice"
