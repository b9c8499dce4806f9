"""Compile ferret's Triton kernels for sm_90 with no GPU present (Triton ships ptxas), so errors
only the real compiler finds surface on CPU-only machines. Prints one line per kernel; the
reconstruct kernels must contain no fused multiply-add (the spec rounds twice)."""

import inspect
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ferret.kernels import projection as P

TARGET = GPUTarget("cuda", 90, 32)
# Every grouped kernel starts with its segment table: program counts, rows, and their number.
TABLE = {"programs_ptr": "*i64", "rows_ptr": "*i64", "count": "i32"}


def build(fn, signature, constexprs, num_warps=4, fusion=False):
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.name not in constexprs
                and p.default is not inspect.Parameter.empty}  # e.g. HAS_BASE=False
    constexprs = {**defaults, **constexprs}
    src = ASTSource(fn, {**TABLE, **signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options={"enable_fp_fusion": fusion, "num_warps": num_warps})


for dtype, tl_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
    rademacher = {"DTYPE": tl_dtype, "GROUPS": P.GROUPS}
    kernel = build(P._reconstruct_kernel, {"g_ptr": "*fp32"}, rademacher)
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    print(f"sm_90 reconstruct rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B, fused-fma {fused}")
    kernel = build(P._compress_kernel, {"part_ptr": "*fp64"}, {**rademacher, "INTERPRET": False})
    print(f"sm_90 compress rademacher {dtype}: cubin {len(kernel.asm['cubin'])} B")
for dtype, tl_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    kernel = build(P._sum_squares_kernel, {"part_ptr": "*fp64"}, {"DTYPE": tl_dtype, "GROUPS": P.GROUPS,
                                                                   "INTERPRET": False})
    print(f"sm_90 sum of squares {dtype}: cubin {len(kernel.asm['cubin'])} B")
kernel = build(P._tree_kernel, {"work_ptr": "*fp64"}, {"TREE": P.TREE, "LEVELS": P.TREE.bit_length() - 1,
                                                       "BASES": P.TREE_BASES})
print(f"sm_90 tree fp64: cubin {len(kernel.asm['cubin'])} B")
gaussian = {"DTYPE": tl.float32, "TILE": P.TILE}
kernel = build(P._gaussian_compress_kernel, {"part_ptr": "*fp64"}, gaussian)
print(f"sm_90 compress gaussian fp32: cubin {len(kernel.asm['cubin'])} B")
kernel = build(P._gaussian_reconstruct_kernel, {"g_ptr": "*fp32"}, gaussian)
print(f"sm_90 reconstruct gaussian fp32: cubin {len(kernel.asm['cubin'])} B")

# SRHT: gather, transform and apply, at the default Hadamard size.
from ferret.kernels import srht as S  # noqa: E402

SIZE = 4096
chunks = {"tile_ptr": "*fp32", "offsets_ptr": "*i64", "sizes_ptr": "*i64"}
for dtype, tl_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    kernel = build(S._gather_kernel, chunks, {"DTYPE": tl_dtype, "SIZE": SIZE})
    print(f"sm_90 srht gather {dtype}: cubin {len(kernel.asm['cubin'])} B")
    kernel = build(S._apply_kernel, {**chunks, "factors_ptr": "*fp32"}, {"DTYPE": tl_dtype, "SIZE": SIZE})
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

for dtype, tl_dtype, signed, lanes in (("fp32", tl.float32, True, 128), ("bf16", tl.bfloat16, True, 128),
                                       ("fp16", tl.float16, True, 128), ("fp32", tl.float32, False, 128),
                                       ("fp32", tl.float32, True, 64), ("fp32", tl.float32, True, 8),
                                       ("fp32", tl.float32, True, 2), ("fp32", tl.float32, False, 2),
                                       ("bf16", tl.bfloat16, True, 1)):
    constexprs = {"DTYPE": tl_dtype, "SIGNED": signed, "TILE": D.TILE, "BL": lanes,
                  "LEVELS": (D.TILE // lanes).bit_length() - 1}
    kernel = build(D._fold_kernel, {"work_ptr": "*fp32"}, constexprs, num_warps=D.NUM_WARPS, fusion=True)
    regs, spills = resources(kernel)
    print(f"sm_90 hadamard fold {dtype} {'signed' if signed else 'partials'}, tile {D.TILE // lanes}x{lanes}: "
          f"cubin {len(kernel.asm['cubin'])} B, {regs} registers, {spills} B spilled")
for dtype, tl_dtype, lanes in (("fp32", tl.float32, 128), ("bf16", tl.bfloat16, 128), ("fp16", tl.float16, 128),
                               ("fp32", tl.float32, 64), ("fp32", tl.float32, 8), ("fp32", tl.float32, 2),
                               ("bf16", tl.bfloat16, 1)):
    kernel = build(D._apply_kernel, {"z_ptr": "*fp32"}, {"DTYPE": tl_dtype, "TILE": D.TILE, "BL": lanes},
                   num_warps=D.NUM_WARPS)
    fused = len(re.findall(r"\bfma\.rn\.f32", kernel.asm["ptx"]))
    regs, spills = resources(kernel)
    print(f"sm_90 hadamard apply {dtype}, tile {D.TILE}, lanes {lanes}: cubin {len(kernel.asm['cubin'])} B, "
          f"{regs} registers, {spills} B spilled, fused-fma {fused}")
    assert fused == 0, "the apply kernel must round twice"
kernel = build(D._sum_folds_kernel, {"folds_ptr": "*i64", "work_ptr": "*fp32", "y_ptr": "*fp32"},
               {"LANES": D.SUM_LANES})
print(f"sm_90 hadamard fold sum: cubin {len(kernel.asm['cubin'])} B")

# Compressing against a start (new - old read in place, rounded to the dtype): the reading kernels'
# HAS_BASE builds.
for dtype, tl_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    kernel = build(P._compress_kernel, {"part_ptr": "*fp64"}, {"DTYPE": tl_dtype, "GROUPS": P.GROUPS,
                                                               "INTERPRET": False, "HAS_BASE": True})
    print(f"sm_90 compress rademacher {dtype} against a start: cubin {len(kernel.asm['cubin'])} B")
    kernel = build(P._sum_squares_kernel, {"part_ptr": "*fp64"}, {"DTYPE": tl_dtype, "GROUPS": P.GROUPS,
                                                                   "INTERPRET": False, "HAS_BASE": True})
    print(f"sm_90 sum of squares {dtype} against a start: cubin {len(kernel.asm['cubin'])} B")
    constexprs = {"DTYPE": tl_dtype, "SIGNED": True, "TILE": D.TILE, "BL": 128, "LEVELS": (D.TILE // 128).bit_length() - 1,
                  "HAS_BASE": True}
    kernel = build(D._fold_kernel, {"work_ptr": "*fp32"}, constexprs, num_warps=D.NUM_WARPS, fusion=True)
    print(f"sm_90 hadamard fold {dtype} against a start: cubin {len(kernel.asm['cubin'])} B")
    kernel = build(S._gather_kernel, chunks, {"DTYPE": tl_dtype, "SIZE": SIZE, "HAS_BASE": True})
    print(f"sm_90 srht gather {dtype} against a start: cubin {len(kernel.asm['cubin'])} B")
