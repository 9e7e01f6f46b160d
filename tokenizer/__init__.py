"""Image tokenizers (TiTok, FlexTok), checkpoint loading and the shared image transform."""
from .base import ImageTokenizer
from .errors import CheckpointError
from .loading import build_tokenizer, load_tokenizer

__all__ = ["ImageTokenizer", "CheckpointError", "build_tokenizer", "load_tokenizer"]
