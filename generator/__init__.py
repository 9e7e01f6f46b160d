"""MaskGIT-style class-conditional generator over pretokenized 1D image tokens (no pixels)."""
from .checkpoint import load_generator
from .model import GeneratorConfig, MaskGITTransformer
from .run import RunDir, TrainState
from .sample import SamplerConfig, generate, guidance_weight
from .train import DataSpec, TrainConfig, TrainJob, fit

__all__ = [
    "DataSpec",
    "GeneratorConfig",
    "MaskGITTransformer",
    "RunDir",
    "SamplerConfig",
    "TrainConfig",
    "TrainJob",
    "TrainState",
    "fit",
    "generate",
    "guidance_weight",
    "load_generator",
]
