"""MaskGIT-style class-conditional generator over pretokenized 1D image tokens (no pixels, no Ray)."""
from .checkpoint import TrainState, load_checkpoint, load_generator, save_checkpoint
from .model import GeneratorConfig, MaskGITTransformer
from .sample import SamplerConfig, generate, guidance_weight
from .train import TrainConfig, fit

__all__ = [
    "GeneratorConfig",
    "MaskGITTransformer",
    "SamplerConfig",
    "TrainConfig",
    "TrainState",
    "fit",
    "generate",
    "guidance_weight",
    "load_checkpoint",
    "load_generator",
    "save_checkpoint",
]
