"""Image tokenizers (TiTok, FlexTok), checkpoint sources and loading, and the shared image transform."""
from .base import ImageTokenizer
from .checkpoint import Checkpoint, read_checkpoint
from .errors import CheckpointError
from .loading import build_tokenizer, load_tokenizer

__all__ = ["Checkpoint", "CheckpointError", "ImageTokenizer", "build_tokenizer", "load_tokenizer", "read_checkpoint"]
