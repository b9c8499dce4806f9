"""Models that ship with ferret."""

from pathlib import Path

STORIES260K = Path(__file__).with_name("assets") / "stories260K"


def stories260k_dir() -> Path:
    """The bundled stories260K Hugging Face model directory (260K-parameter Llama, MIT; see its LICENSE)."""
    return STORIES260K
