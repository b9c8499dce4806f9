"""The quick demonstration: compress a real model's weights (treated as a full-parameter update),
send them through the packet encoding, reconstruct them, and report sizes, timings and the
estimator's error against theory."""

from __future__ import annotations

import time
from pathlib import Path

from . import Layout, Packet, compress, num_threads, reconstruct, simd_level


def demo(model_dir: Path, budget: int, seed: int, grouping: str) -> None:
    """Compress the weights in ``model_dir/model.safetensors`` with ``budget`` coordinates, round-trip
    the packet through bytes, reconstruct, and print sizes, timings and the error against theory."""
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    update = {name: w.float() for name, w in weights.items()}
    d = sum(w.numel() for w in update.values())
    print(f"model: {model_dir.name}, {len(update)} tensors, {d:,} parameters "
          f"(core: {simd_level()}, {num_threads()} threads)", flush=True)

    t0 = time.perf_counter()
    packet = compress(update, seed=seed, budget=budget, grouping=grouping)
    t1 = time.perf_counter()
    wire = packet.to_bytes()
    estimate = reconstruct(Packet.from_bytes(wire), like=update)
    t2 = time.perf_counter()

    full_bytes = 4 * d
    print(f"packet: {packet.n_blocks} blocks, {packet.coords.size} coordinates, {len(wire):,} bytes "
          f"(full update: {full_bytes:,} bytes, {full_bytes / len(wire):,.0f}x smaller)")
    print(f"compress {1e3 * (t1 - t0):.1f} ms, reconstruct {1e3 * (t2 - t1):.1f} ms")
    layout = Layout.of(update, grouping)
    names = [e.name for e in layout.entries]
    block_norm2 = [sum(float(update[names[i]].double().pow(2).sum()) for i in entries) for entries in layout.block_entries]
    # Rademacher: E||estimate - update||^2 = sum over blocks of (d_b - 1) / n_b * ||update_b||^2.
    theory = sum((size - 1) / int(n) * nb for size, n, nb in zip(layout.block_sizes, packet.counts, block_norm2))
    err = sum(float((estimate[n] - update[n]).double().pow(2).sum()) for n in update)
    total = sum(block_norm2)
    print(f"error of this one reconstruction: ||estimate - update||^2 = {err:.4g}, {err / total:.1f} times "
          f"||update||^2 = {total:.4g}; theory expects {theory:.4g} ({theory / total:.1f} times) on average over seeds")
    print(f"  (the estimate is unbiased: averaged over many clients' or rounds' seeds it converges to the update; "
          f"one draw of K = {packet.coords.size} coordinates for d = {d:,} numbers has a squared error of about "
          f"d/K = {d / packet.coords.size:.0f} times the update's, more where blocks get fewer coordinates)")
