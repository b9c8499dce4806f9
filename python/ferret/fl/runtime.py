"""Where and how a run computes: its device, the dtype of its forward passes, and the kernels of
ferret's projection and LoRA merge.

Three settings, each ``"auto"`` by default, resolved by :func:`resolve` alone (``ferret run``,
:func:`ferret.fl.run`, the references and the Flower apps all call it):

* ``device``: ``"auto"`` (``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``),
  ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The model, the batches, the optimizer state and every
  server buffer live there.
* ``dtype``: ``"auto"`` (bf16 on a CUDA device with native bf16, fp32 otherwise), ``"fp32"`` or
  ``"bf16"``. Weights stay fp32; bf16 runs the forward passes under ``torch.autocast`` (allowed
  on the CPU, but slow there).
* ``backend``: ``"auto"`` (the compiled core for CPU tensors, Triton for CUDA tensors), ``"core"``
  (CPU only) or ``"triton"`` (on the CPU: Triton's interpreter, for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass

import torch

from .settings import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("auto", "core", "triton")


@dataclass(frozen=True)
class Runtime:
    """Resolved settings: the ``device`` everything lives on, the ``dtype`` forward passes compute
    in (fp32, or bf16 under autocast), and the ``backend`` of ferret's kernels (``"core"``,
    ``"triton"``, or None: chosen by the tensors' device)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str | None = None

    def autocast(self):
        """A context for forward passes: bf16 autocast on ``device`` when ``dtype`` is bf16, else nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def lora_backend(self) -> str | None:
        """The backend for :func:`ferret.lora.merge_into` (``"torch"`` there is the core's CPU path)."""
        return "torch" if self.backend == "core" else self.backend

    def synchronize(self) -> None:
        """Wait for the work queued on a CUDA device, so that a timing measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to ``device`` in place and make that device CUDA's current one (Triton
        launches its kernels there); returns ``model``."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return model.to(self.device)


DEFAULT = Runtime()  # CPU, fp32, kernels chosen by the tensors' device


def resolve(device: str = "auto", dtype: str = "auto", backend: str = "auto") -> Runtime:
    """The :class:`Runtime` for the three settings (strings, as in a config).

    Raises :class:`~ferret.fl.settings.ConfigError` with one message for an unknown or unavailable
    device, an unknown dtype or bf16 on a GPU without it, an unknown backend, ``"core"`` on a
    CUDA device, or ``"triton"`` without Triton. ``"triton"`` on the CPU sets
    ``TRITON_INTERPRET=1`` (Triton reads it once, when it is first imported) and refuses when
    triton was imported without it.
    """
    on = _device(device)
    return Runtime(on, _dtype(dtype, on), _backend(backend, on))


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(n: int) -> int:
    """``n`` CPU threads, checked: from 1 to the CPUs this process may run on. Raises
    :class:`ConfigError` otherwise (more threads than CPUs only slow a run down)."""
    if n < 1 or n > cpu_count():
        raise ConfigError(f"threads must be from 1 to this machine's {cpu_count()} CPUs, got {n}")
    return n


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of ``tensors`` (CPU tensors as they are): every copy is queued, then one wait,
    instead of a sync per tensor."""
    host = {name: t.to("cpu", non_blocking=True) for name, t in tensors.items()}
    for device in {t.device for t in tensors.values() if t.is_cuda}:
        torch.cuda.synchronize(device)  # the non-blocking copies have landed
    return host


def _device(name) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if match is None:
        _refuse(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        _refuse(f"device {name!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
    index = int(match[1]) if match[1] is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        _refuse(f"device {name!r}: this machine has {count} GPU{'s' if count > 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", index)


def _dtype(name, device: torch.device) -> torch.dtype:
    if name not in ("auto", *DTYPES):
        _refuse(f"unknown dtype {name!r}: use 'auto', 'fp32' or 'bf16'")
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return torch.float32
    if device.type == "cuda" and not _bf16_supported(device):
        if name == "auto":
            return torch.float32
        _refuse(f"dtype 'bf16': {device} has no bf16 support: use 'fp32' or 'auto'")
    return torch.bfloat16


def _bf16_supported(device: torch.device) -> bool:
    # native bf16 only (Ampere and later, or ROCm): emulated bf16 is slower than fp32
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def _backend(name, device: torch.device) -> str | None:
    if name not in BACKENDS:
        _refuse(f"unknown backend {name!r}: use 'auto', 'core' or 'triton'")
    if name == "auto":
        return None
    if name == "core" and device.type != "cpu":
        _refuse(f"backend 'core' reads CPU memory only, but the device is {device}: use 'triton' or 'auto'")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            _refuse("backend 'triton' needs Triton: pip install 'ferret-fl[gpu]'")
        if device.type == "cpu":
            _interpret_triton()
    return name


def _interpret_triton() -> None:
    """Triton runs CPU tensors only in its interpreter, which it chooses once, at its first import."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _refuse("backend 'triton' on the CPU runs Triton's interpreter, which needs TRITON_INTERPRET=1 before "
                "triton is first imported, and triton was imported without it: set TRITON_INTERPRET=1 in the "
                "environment, or use backend 'core'")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        _refuse(f"backend 'triton' on the CPU needs TRITON_INTERPRET=1, but it is "
                f"{os.environ['TRITON_INTERPRET']!r}: unset it, or use backend 'core'")


def _refuse(message: str):
    raise ConfigError(message)
