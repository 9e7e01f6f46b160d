"""FlexTok (arXiv 2502.13967): the model (``model``), its config parsing (``config``), building
blocks (``layers``, ``parts``), the KL autoencoder (``vae``) and per-image token counts (``counts``)."""
from .config import FlexTokConfig
from .model import FlexTok

__all__ = ["FlexTok", "FlexTokConfig"]
